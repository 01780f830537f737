"""stepforge.loop"""
