"""`ConfigError` and the one message format of every config check: `section.key = value: requirement`.

Each plugin config section validates itself with these (`validate()`); `titan.preflight` calls
every section once and adds the checks that span sections.
"""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the TOML key (or file) at fault."""


def require(condition: bool, key: str, value, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: {requirement}")


def require_bool(section, name: str, key: str) -> None:
    value = getattr(section, key)
    require(isinstance(value, bool), f"{name}.{key}", value, "must be true or false")
