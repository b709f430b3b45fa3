"""Placeholder: being written."""
class HookedModel: pass
