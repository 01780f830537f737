"""The warm verifier and its cache: bounded, keyed by content, re-reading changed task files."""

from __future__ import annotations

import os
import shutil

import torch

from stepforge.benchmark.cache import BoundedLRU, tensor_bytes
from stepforge.benchmark.schema import TASKS_ROOT
from stepforge.benchmark.verifier import cache_stats, clear_caches
from stepforge.benchmark.warm import WarmVerifier


def test_lru_keeps_within_its_entry_and_byte_bounds():
    cache = BoundedLRU(max_entries=3, max_bytes=100)
    for key in "abc":
        cache.get(key, dict)
    cache.get("a", dict)  # now the most recently used
    cache.get("d", dict)
    assert "b" not in cache and {"a", "c", "d"} == {k for k in "abcd" if k in cache}
    cache.grew("c", 60)
    cache.grew("d", 60)  # 120 bytes: the least recently used (c) goes
    assert "c" not in cache and "a" in cache and "d" in cache and cache.nbytes == 60
    cache.grew("d", 500)  # the entry in use stays even when it alone is over the bound
    assert len(cache) == 1 and "d" in cache and cache.stats()["evictions"] == 3
    assert tensor_bytes([torch.zeros(4), [torch.zeros(2, dtype=torch.float64)], "x"]) == 32


def test_edited_task_file_is_read_again_and_verified_afresh(tmp_path):
    root = tmp_path / "tasks"
    (root / "norm").mkdir(parents=True)
    path = root / "norm" / "G_0_8_01.yaml"
    shutil.copy(TASKS_ROOT / "norm" / "G_0_8_01.yaml", path)
    clear_caches()
    warm = WarmVerifier(root=root, verify_kwargs={"seeds": (0,)})
    assert warm.verify("norm/G_0_8_01").passed
    assert warm.verify("norm/G_0_8_01").passed
    assert cache_stats()["hits"] >= 1 and cache_stats()["entries"] == 1
    text = path.read_text().replace("return [torch.sqrt(input[0])]", "return [torch.sqrt(input[0]) * 1.01]")
    path.write_text(text)
    os.utime(path, ns=(1, 1))  # a changed mtime even on a coarse clock
    verdict = warm.verify("norm/G_0_8_01")  # the same reference program, now against the edited fn
    assert verdict.stage == "value" and not verdict.passed
    assert cache_stats()["entries"] == 2  # a new fingerprint: nothing of the old task was used
    assert warm.verify_dict("norm/G_0_8_01")["stage"] == "value"
