"""cxr/cli"""
