"""stepforge.simulator"""
