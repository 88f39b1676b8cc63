"""YAML configuration -> environment interpolation -> schema -> :class:`gateway.model.Config`.

The YAML is *composed* into nodes rather than loaded into Python objects, so every
value still knows the line it came from and every problem can point at it. The
whole file is validated in one pass and every problem is reported at once, as an
:class:`gateway.errors.ConfigError`; an operator never sees a traceback.

Unknown keys are errors, not warnings: a misspelt ``max_age`` or ``methods`` that
were silently ignored would weaken the policy without anyone noticing.

Apart from reading the config file (and the secret files it names) nothing here
does I/O. The modules:

- ``gateway/config.schema.json``: every key, its type, default and meaning (the one
  description; README tables and editors use it too)
- :mod:`gateway.config.loader`: YAML nodes, ``${NAME}`` interpolation, typed readers
- :mod:`gateway.config.schema`: the schema pass, in the gateway's own words
- :mod:`gateway.config.build`, :mod:`gateway.config.build_rules`: checks a schema
  cannot make, and the frozen model
- :mod:`gateway.config.defaults`: defaults (from the schema), limits, and why
- :mod:`gateway.config.docs`: the README's configuration tables
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from gateway import model
from gateway.conditions import parse_duration_s
from gateway.config.build import _Validator
from gateway.config.defaults import *  # noqa: F403 - the DEFAULT_* and limits, as before
from gateway.config.loader import _merge_problems
from gateway.errors import ConfigError, ConfigProblem

__all__ = ["ConfigError", "ConfigProblem", "load_config", "load_config_text", "parse_duration_s"]


def load_config(path: str, environ: Mapping[str, str] | None = None) -> model.Config:
    """Read and validate the config file at ``path``; raise ConfigError listing every problem.

    Relative ``secret_file``-style paths are resolved against the file's directory.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("(file)", "file not found", path)]) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start})"
        raise ConfigError([ConfigProblem("(file)", message, path)]) from None
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        raise ConfigError([ConfigProblem("(file)", message, path)]) from None
    return load_config_text(text, path, environ, base_dir=os.path.dirname(path) or ".")


def load_config_text(
    text: str,
    source: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str = ".",
) -> model.Config:
    """Validate config ``text``; ``source`` names it in messages. Raises ConfigError."""
    validator = _Validator(source, os.environ if environ is None else environ, base_dir)
    root = validator.compose(text)
    # First the schema (types, enums, required and unknown keys), then the builders:
    # they check what a schema cannot and build the model. A key the schema already
    # faulted is not reported a second time.
    schema_problems = [] if root is None else validator.schema_problems(root)
    config = None if root is None else validator.config(root)
    problems = _merge_problems(validator.problems, schema_problems)
    if problems or config is None:
        raise ConfigError(problems or [ConfigProblem("(top level)", "invalid", source)])
    return config
