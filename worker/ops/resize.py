"""Resize (and the deprecated Upsample): nearest and linear interpolation. (being written)"""
