"""cxr/data"""
