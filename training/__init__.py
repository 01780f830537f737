"""stepforge.training: the SFT baseline from the experience buffer, and the SFT-vs-self-improvement ablation.

Pieces:

- `settings.py`: `SFTSettings` (LoRA rank/alpha/dropout/targets, learning rate,
  epochs or max_steps, batch size, max_length, seed, precision, data and
  prompt options), loaded from `configs/sft_*.yaml` with `--set` overrides.
- `data.py`: a run's buffer (and extra solved tasks) as a chat dataset:
  the exact prompt the proposer saw + the earned program as the assistant
  answer, in the ```python block the proposer is asked for.
- `sft.py`: trl's SFTTrainer with a peft LoRA adapter, loss on the answer
  only; saves adapter + tokenizer (and the merged model with `--merge`).
- `ablate.py`: `stepforge ablate` (base, base+si, sft, sft+si on one split).
- `cli.py`: `stepforge train sft` and `stepforge ablate`.

Evaluating a tuned model goes through the ordinary loop: `stepforge improve`
with `proposer.backend.lora_path=ADAPTER_DIR` (the `--out` folder of
`stepforge train sft`), on the same tasks, `n` and temperatures as the
in-context arm:

- transformers backend (`kind: hf`, CPU or GPU): the adapter is loaded with
  peft on top of `proposer.backend.model` (the base model the adapter was
  trained from, recorded in ADAPTER_DIR/sft.json);
- vLLM (`kind: vllm`, GPU): the adapter is served with a `LoRARequest`; the
  engine's `max_lora_rank` is taken from the adapter (or
  `proposer.backend.max_lora_rank`). vLLM's LoRA cannot load adapters with
  fully trained modules (`lora.modules_to_save`, used by the tiny CPU
  config): serve `ADAPTER_DIR/merged` (written with `--merge`) as
  `proposer.backend.model` instead, without `lora_path`.

A model trained on the compact prompt (`prompt.knowledge: none` of the SFT
settings) must be evaluated with it: `proposer: {kind: llm, knowledge: none,
backend: {...}}` (what `stepforge ablate` writes for `prompt.knowledge: none`).
"""
