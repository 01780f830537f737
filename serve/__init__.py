"""stepforge.serve"""
