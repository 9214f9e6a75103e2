"""Pydantic models of every action's input (the contract in docs/API.md).

Validation errors become one ``invalid_input`` message naming the field, so a
client learns what to fix from the error alone.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, List, Literal, Mapping, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import InvalidInput, excerpt

VOICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
VOICE_ID_RE = re.compile(VOICE_ID_PATTERN)


def is_voice_id(value: object) -> bool:
    """Whether ``value`` is a whole voice id (``fullmatch``: ``$`` alone would accept "id\\n")."""
    return isinstance(value, str) and VOICE_ID_RE.fullmatch(value) is not None

AudioFormat = Literal["wav", "pcm_s16le", "flac", "mp3", "opus"]

# Output rates each encoder accepts. Opus only runs at these five rates; MP3 at
# the MPEG-1/2/2.5 rates; the PCM containers take any rate in the usual range.
SAMPLE_RATES = {
    "opus": (8000, 12000, 16000, 24000, 48000),
    "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
}
PCM_RATE_RANGE = (8000, 48000)

Number = Union[StrictFloat, StrictInt]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_voice_id(value: str) -> str:
    if not is_voice_id(value):
        raise ValueError(
            "must be 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    return value


class GenerateRequest(_Request):
    action: Literal["generate"] = "generate"
    text: StrictStr
    voice_id: Optional[StrictStr] = None
    format: AudioFormat = "wav"
    sample_rate: StrictInt = 24000
    stream: StrictBool = False
    output: Literal["auto", "inline", "s3"] = "auto"
    seed: Optional[StrictInt] = Field(default=None, ge=0, le=2**63 - 1)
    # Sampling: None takes the served model's default (``engine.variants``),
    # which also refuses values a model ignores or allows in a narrower range.
    exaggeration: Optional[Number] = Field(default=None, ge=0.0, le=2.0)
    cfg_weight: Optional[Number] = Field(default=None, ge=0.0, le=1.0)
    temperature: Optional[Number] = Field(default=None, ge=0.05, le=5.0)
    top_p: Optional[Number] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(default=None, ge=0, le=10000)
    min_p: Optional[Number] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[Number] = Field(default=None, ge=1.0, le=2.0)
    language: StrictStr = "en"

    @field_validator("text")
    @classmethod
    def _text_length(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        limit = (info.context or {}).get("max_text_chars", 5000)
        if not value:
            raise ValueError("must not be empty")
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters; the limit is {limit}")
        check_speakable(value)
        return value

    @field_validator("voice_id")
    @classmethod
    def _voice_id(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _check_voice_id(value)

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        return value.strip().lower()

    @model_validator(mode="after")
    def _rate_fits_format(self) -> "GenerateRequest":
        allowed = SAMPLE_RATES.get(self.format)
        if allowed is not None and self.sample_rate not in allowed:
            raise ValueError(f"sample_rate {self.sample_rate} is not supported by {self.format}; "
                             f"use one of {', '.join(map(str, allowed))}")
        low, high = PCM_RATE_RANGE
        if allowed is None and not low <= self.sample_rate <= high:
            raise ValueError(f"sample_rate must be between {low} and {high}")
        return self


# Text may hold any script and emoji, and tab, newline and carriage return as
# layout. Other control characters and lone surrogates (which JSON can carry
# but UTF-8 cannot) are refused, not stripped: they are a client's bug, and
# silently speaking something else than was sent hides it.
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def check_speakable(text: str) -> None:
    """``ValueError`` for characters no voice can read, or for text with nothing to say."""
    speakable = False
    for position, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cs":
            raise ValueError(f"holds a lone surrogate (U+{ord(char):04X}) at character "
                             f"{position}; send valid UTF-8 text")
        if category == "Cc" and char not in _ALLOWED_CONTROLS:
            raise ValueError(f"holds the control character U+{ord(char):04X} at character "
                             f"{position}; only tab, newline and carriage return are allowed")
        # Letters, digits and symbols (emoji included) can be spoken;
        # punctuation, spaces and invisible format marks alone cannot.
        speakable = speakable or category[0] in "LNS"
    if not speakable:
        raise ValueError("has nothing to speak (only punctuation, spaces or invisible "
                         "characters)")


class UploadVoiceRequest(_Request):
    action: Literal["upload_voice"]
    voice_id: StrictStr
    audio_base64: Optional[Union[StrictStr, List[StrictStr]]] = None
    audio_url: Optional[Union[StrictStr, List[StrictStr]]] = None
    voice_base64: Optional[StrictStr] = None
    overwrite: StrictBool = False
    rebuild: StrictBool = False

    _voice_id = field_validator("voice_id")(classmethod(lambda cls, v: _check_voice_id(v)))

    @model_validator(mode="after")
    def _one_source(self) -> "UploadVoiceRequest":
        given = [name for name in ("audio_base64", "audio_url", "voice_base64")
                 if getattr(self, name) not in (None, [])]
        if len(given) != 1:
            raise ValueError("give exactly one of audio_base64, audio_url, voice_base64")
        if self.rebuild and self.voice_base64 is None:
            raise ValueError("rebuild applies only to voice_base64")
        return self


class GetVoiceRequest(_Request):
    action: Literal["get_voice"]
    voice_id: StrictStr
    export: StrictBool = False

    _voice_id = field_validator("voice_id")(classmethod(lambda cls, v: _check_voice_id(v)))


class ListVoicesRequest(_Request):
    action: Literal["list_voices"]


class RebuildVoicesRequest(_Request):
    """Remake every stored voice made for another model (an endpoint that switched models)."""

    action: Literal["rebuild_voices"]


class DeleteVoiceRequest(_Request):
    action: Literal["delete_voice"]
    voice_id: StrictStr

    _voice_id = field_validator("voice_id")(classmethod(lambda cls, v: _check_voice_id(v)))


class HealthRequest(_Request):
    action: Literal["health"]


REQUESTS = {
    "generate": GenerateRequest,
    "upload_voice": UploadVoiceRequest,
    "get_voice": GetVoiceRequest,
    "list_voices": ListVoicesRequest,
    "rebuild_voices": RebuildVoicesRequest,
    "delete_voice": DeleteVoiceRequest,
    "health": HealthRequest,
}

Request = Union[GenerateRequest, UploadVoiceRequest, GetVoiceRequest, ListVoicesRequest,
                RebuildVoicesRequest,
                DeleteVoiceRequest, HealthRequest]


# What each field must be, in the client's words. pydantic's own wording names
# its internals (``temperature.float: Input should be a valid number``, one
# line per member of a union), so a field's type or range error is answered
# with this one sentence instead; messages of our own validators pass through.
_VOICE_ID_RULE = "must be 1-64 letters, digits, '_' or '-', starting with a letter or digit"
_PLAIN_RULES = {
    "action": "must be one of: " + ", ".join(REQUESTS),
    "text": "must be a string",
    "voice_id": _VOICE_ID_RULE,
    "format": "must be one of: wav, pcm_s16le, flac, mp3, opus",
    "output": "must be one of: auto, inline, s3",
    "sample_rate": (f"must be a whole number of samples per second, {PCM_RATE_RANGE[0]} to "
                    f"{PCM_RATE_RANGE[1]}"),
    "seed": "must be a whole number from 0 to 9223372036854775807, or null for a random seed",
    "stream": "must be true or false",
    "overwrite": "must be true or false",
    "rebuild": "must be true or false",
    "export": "must be true or false",
    "language": "must be a language code string such as \"en\"",
    "top_k": "must be a whole number from 0 to 10000 (0: off)",
    "audio_base64": "must be a base64 string, or a list of them (one per clip)",
    "audio_url": "must be an http(s) URL string, or a list of them (one per clip)",
    "voice_base64": "must be a base64 string (a voice file exported by get_voice)",
}


def _number_rule(model: type, name: str) -> Optional[str]:
    """"must be a number from 0.05 to 5" from a numeric field's bounds, or ``None``."""
    field = model.model_fields.get(name)
    if field is None or field.annotation not in (Number, Optional[Number]):
        return None
    bounds = {key: getattr(item, key) for item in field.metadata
              for key in ("ge", "gt", "le", "lt") if getattr(item, key, None) is not None}
    low = (f"from {bounds['ge']:g}" if "ge" in bounds else
           f"greater than {bounds['gt']:g}" if "gt" in bounds else None)
    high = f"at most {bounds['le']:g}" if "le" in bounds else None
    if low and low.startswith("from") and high:
        return f"must be a number {low} to {bounds['le']:g}"
    return "must be a number " + " and ".join(part for part in (low, high) if part)


def describe_errors(exc: ValidationError, model: Optional[type] = None) -> str:
    """One readable line from pydantic's errors: ``field: problem; field: problem``.

    One sentence per field, in the order pydantic reports them: the field's
    rule (``temperature: must be a number from 0.05 to 5``), our validator's
    message, ``is required`` or ``unknown field``.
    """
    fields = getattr(model, "model_fields", {})
    said: dict = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        # Field names come from the client: an unknown one is quoted, never in full.
        name = excerpt(str(loc[0]), 40) if loc else ""
        if name in said:
            continue  # one sentence per field (a union reports one error per member)
        kind = error["type"]
        if kind == "extra_forbidden" or (loc and model is not None and loc[0] not in fields):
            message = "unknown field"
        elif kind == "missing":
            message = "is required"
        elif kind == "value_error":
            message = error["msg"][len("Value error, "):] if error["msg"].startswith(
                "Value error, ") else error["msg"]
        else:
            message = (_number_rule(model, loc[0]) if loc and model is not None else None) \
                or _PLAIN_RULES.get(name) or "has a value of the wrong type or out of range"
        said[name] = message
    return "; ".join(f"{name}: {message}" if name else message for name, message in said.items())


def parse_request(job_input: Any, *, max_text_chars: int) -> Request:
    """Validate a job's ``input`` into the request model of its action, or raise ``InvalidInput``."""
    if not isinstance(job_input, Mapping):
        raise InvalidInput("input must be a JSON object")
    action = job_input.get("action")
    if action is None:
        if "text" not in job_input:
            raise InvalidInput("input needs an 'action' (one of: " + ", ".join(REQUESTS)
                               + ") or a 'text' to speak")
        action = "generate"
    model = REQUESTS.get(action) if isinstance(action, str) else None
    if model is None:
        raise InvalidInput(f"unknown action '{excerpt(action, 40)}'; use one of: "
                           + ", ".join(REQUESTS))
    data = dict(job_input)
    data["action"] = action
    try:
        return model.model_validate(data, context={"max_text_chars": max_text_chars})
    except ValidationError as exc:
        raise InvalidInput(describe_errors(exc, model)) from None
