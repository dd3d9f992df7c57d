"""Exceptions raised by bon-sr. Each message names the problem and the fix."""

from __future__ import annotations


class BonSRError(Exception):
    """Base class for every error bon-sr raises on purpose."""


class ConfigError(BonSRError, ValueError):
    """An option has a value that cannot work (the message says what to change)."""


class InputError(BonSRError, ValueError):
    """A prompt file or prompt is malformed (the message names file and line)."""


class ModelError(BonSRError):
    """A model cannot be found, fetched, converted or loaded."""


class MissingExtraError(BonSRError, ImportError):
    """An optional dependency is missing; the message names the pip extra."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"The optional package '{package}' is not installed{what}. "
            f"Install it with: pip install 'bon-sr[{extra}]'"
        )
        self.package = package
        self.extra = extra


#: How each interface spells an option: (the CLI flag, the API keyword, the server's field).
#: A field the server takes from OpenAI's own request is spelled as OpenAI names it (its
#: ``param`` in an error); ``None``: the interface has no such option.
SPELLINGS: dict[str, tuple[str, str, str | None]] = {
    "selector": ("--selector", "selector", "bon_sr.selector"),
    "answer": ("--answer", "answer", "bon_sr.answer"),
    "answer_regex": ("--answer-regex", "answer_regex", "bon_sr.answer_regex"),
    "tests": ("a prompt line's 'tests' field", "tests", "bon_sr.tests"),
    "utility": ("--utility", "utility", "bon_sr.utility"),
    "score": ("--score/--no-score", "score", None),
    "logit_stats": ("--logit-stats", "logit_stats", None),
    "backend": ("--backend", "backend", None),
    "scorer": ("--scorer", "scorer", None),
    "n": ("--n", "n", "bon_sr.n"),
    "temperature": ("--temperature", "temperature", "temperature"),
    "top_p": ("--top-p", "top_p", "top_p"),
    "max_new_tokens": ("--max-new-tokens", "max_new_tokens", "max_tokens"),
    "stop": ("--stop", "stop", "stop"),
    "greedy": ("--greedy", "greedy", "temperature"),
    "include_greedy": ("--include-greedy", "include_greedy", None),
    "seed": ("--seed", "seed", "seed"),
    "token_set": ("--token-set", "token_set", "bon_sr.token_set"),
    "layer": ("--layer", "layer", None),
    "norm": ("--norm", "norm", None),
    "window": ("--window", "window", None),
    "transform": ("--transform", "transform", None),
    "max_batch_tokens": ("--batch-tokens", "max_batch_tokens", None),
}
INTERFACES = ("cli", "api", "server")


def spell(option: str, interface: str = "api") -> str:
    """``option`` as ``interface`` (cli, api, server) names it; the server's own settings
    (an option a request cannot set) are its CLI flags."""
    cli, api, server = SPELLINGS[option]
    if interface == "cli":
        return cli
    if interface == "server":
        return server or f"the server's {cli}"
    return api


class OptionError(ConfigError):
    """An option's value cannot work. ``option`` is its canonical name (a key of
    ``SPELLINGS``); the message names options as ``{@name}`` or, with a value,
    ``{@name:value}``, rendered per interface by :meth:`render` (``str()`` gives the API's
    spelling): ``{@scorer:'hf'}`` is ``scorer='hf'`` in the API, ``--scorer hf`` on the
    command line and ``bon_sr.scorer 'hf'`` on the server."""

    def __init__(self, option: str, template: str):
        if option not in SPELLINGS:
            raise KeyError(f"unknown option {option!r}")
        self.option = option
        self.template = template
        super().__init__(self.render("api"))

    def render(self, interface: str) -> str:
        import re

        def one(m: re.Match[str]) -> str:
            name, value = m.group(1), m.group(2)
            spelled = spell(name, interface)
            if value is None:
                return spelled
            if interface == "api":
                return f"{spelled}={value}"
            if interface == "cli" and "/" in spelled:  # a boolean flag pair: --x/--no-x
                on, off = spelled.split("/")
                return off if value == "False" else on
            return f"{spelled} {value.strip(chr(39)) if interface == 'cli' else value}"

        return re.sub(r"\{@(\w+)(?::([^}]*))?\}", one, self.template)
