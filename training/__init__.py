"""stepforge.training"""
