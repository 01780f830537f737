"""stepforge.benchmark"""
