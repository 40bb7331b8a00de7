"""Imports every architecture module so that its ``@MODELS.register`` decorators run."""
