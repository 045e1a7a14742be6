"""Loads the digits example recipe by path, for the test recipes beside this file."""

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[2] / "examples" / "digits" / "recipe.py"
_spec = importlib.util.spec_from_file_location("nsd_test_digits_recipe", _path)
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)
