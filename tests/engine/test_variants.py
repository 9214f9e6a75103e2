"""Each model's sampling defaults, ignored fields and ranges (``engine.variants``)."""

import pytest

from chatterbox_worker.engine.variants import SAMPLING_FIELDS, VARIANTS, variant
from chatterbox_worker.errors import ConfigError

UPSTREAM_DEFAULTS = {
    # ChatterboxTTS.generate (0.1.7); it has no top_k.
    "original": {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8, "top_p": 1.0,
                 "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.2},
    # ChatterboxMultilingualTTS.generate: a stronger repetition penalty.
    "multilingual": {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8, "top_p": 1.0,
                     "top_k": 0, "min_p": 0.05, "repetition_penalty": 2.0},
    # ChatterboxTurboTTS.generate: no guidance, no exaggeration, no min-p.
    "turbo": {"exaggeration": 0.0, "cfg_weight": 0.0, "temperature": 0.8, "top_p": 0.95,
              "top_k": 1000, "min_p": 0.0, "repetition_penalty": 1.2},
}


def upstream_generate_defaults(name):
    """The defaults of upstream's own generate signature, read from the installed package."""
    import inspect

    from chatterbox.mtl_tts import ChatterboxMultilingualTTS
    from chatterbox.tts import ChatterboxTTS
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    cls = {"original": ChatterboxTTS, "multilingual": ChatterboxMultilingualTTS,
           "turbo": ChatterboxTurboTTS}[name]
    params = inspect.signature(cls.generate).parameters
    return {k: p.default for k, p in params.items() if k in SAMPLING_FIELDS}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_defaults_are_those_of_upstream_generate(name):
    spec = VARIANTS[name]
    assert spec.sampling({}) == UPSTREAM_DEFAULTS[name]
    for field, value in upstream_generate_defaults(name).items():
        assert spec.defaults[field] == value, field


def test_given_values_win_over_defaults():
    got = VARIANTS["original"].sampling({"temperature": 1.3, "min_p": None})
    assert got["temperature"] == 1.3 and got["min_p"] == 0.05


@pytest.mark.parametrize("name,field,neutral", [
    ("original", "top_k", 0), ("multilingual", "top_k", 0),
    ("turbo", "cfg_weight", 0), ("turbo", "exaggeration", 0), ("turbo", "min_p", 0)])
def test_a_field_the_model_ignores_takes_only_its_neutral_value(name, field, neutral):
    spec = VARIANTS[name]
    assert spec.sampling({field: neutral})[field] == neutral
    with pytest.raises(ValueError) as err:
        spec.sampling({field: 0.3 if field != "top_k" else 50})
    assert str(err.value) == (f"{field}: the {spec.title} model does not use it; omit it or "
                              f"send {neutral}")


def test_a_narrower_range_is_named_with_the_model():
    with pytest.raises(ValueError, match=r"exaggeration: must be a number from 0.25 to 2 for the "
                                         r"original \(English\) model"):
        VARIANTS["original"].sampling({"exaggeration": 0.1})


def test_unknown_or_unserved_variants_stop_the_worker_naming_the_served_ones():
    served = ", ".join(v.name for v in VARIANTS.values() if v.served)
    with pytest.raises(ConfigError, match="'nope' is not a Chatterbox model; use one of: " + served):
        variant("nope")
    for spec in VARIANTS.values():
        if not spec.served:
            with pytest.raises(ConfigError, match="is not served by this worker yet"):
                variant(spec.name)
