"""Output formats: the native checkpoint and the exporters other engines load, behind one
registry (:mod:`compensator.io.formats`)."""
