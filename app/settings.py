"""Settings, read once from the environment (and a `.env` file in the working directory)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dotenv import load_dotenv

from app.domain.names import is_plain_name
from app.domain.rules import ConversationLimits

DEFAULT_MODEL_DIR = "models/SmolLM2-135M-Instruct"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///database/chipi.db"
# Speech models are picked up by name from these folders: `models/whisper/NAME.pt`, `voices/NAME.onnx` (+ .json).
WHISPER_DIR = "models/whisper"
VOICES_DIR = "voices"
DEFAULT_WHISPER_MODEL = "tiny.en"
DEFAULT_VOICE = "en_US-joe-medium"


class SettingsError(ValueError):
    """A setting has a value Chipi cannot use."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip() or default


def _env_int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}, got {value}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def _env_origins(name: str) -> tuple[str, ...]:
    """Comma-separated origins (`scheme://host[:port]`), or `*` for any."""
    origins = tuple(origin.strip().rstrip("/") for origin in os.environ.get(name, "").split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise SettingsError(f"{name}: {origin!r} is not an origin like https://chat.example.com or *")
    return origins


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _env_name(name: str, default: str) -> str:
    """A model or voice name, looked up inside Chipi's folders: one plain path component, never a path."""
    value = _env(name, default)
    if not is_plain_name(value):
        raise SettingsError(f"{name} must be a plain name (letters, digits, '.', '_', '-'), not a path: {value!r}")
    return value


def _env_quantize(dtype: str) -> str:
    quantize = _env_choice("CHIPI_QUANTIZE", "auto", ("auto", "none", "int8", "int4"))
    if quantize in ("int8", "int4") and dtype not in ("auto", "float32"):
        raise SettingsError(f"CHIPI_QUANTIZE={quantize} quantizes float32 weights: set CHIPI_DTYPE=float32 or auto")
    return quantize


@dataclass(frozen=True)
class Settings:
    """Every knob Chipi has; the README documents each one with its default."""

    database_url: str
    host: str
    port: int
    model: str
    device: str
    dtype: str
    quantize: str
    activation_bits: int  # 16, or 8: 4-bit layers' activations, rounded per block (CHIPI_ACTIVATION_BITS)
    kv_cache_dtype: str  # float16 | float32: what Chipi's CPU forward keeps keys and values in (CHIPI_KV_CACHE_DTYPE)
    max_new_tokens: int
    temperature: float
    top_p: float
    context_window: int
    prefix_cache_mb: int
    max_prompt_chars: int
    max_title_chars: int
    max_body_bytes: int
    max_conversation_messages: int
    max_conversation_chars: int
    max_generation_seconds: float
    rate_limit: int  # requests per minute per client (API key or address); 0: no limit
    auto_title: str  # model | first-message | off (off: the first-message rule, as the seed did)
    system_prompt: str
    stream_flush_seconds: float
    stream_event_interval_seconds: float
    disconnect_grace_seconds: float
    max_concurrent_generations: int
    max_queued_generations: int
    queue_timeout_seconds: float
    ws_heartbeat_seconds: float
    remote_base_url: str
    remote_api_key: str
    remote_model: str
    remote_timeout_seconds: float
    stale_stream_seconds: float
    database_connect_timeout_seconds: float
    database_retry_seconds: float
    shutdown_grace_seconds: float
    whisper_model: str
    voice: str
    max_audio_bytes: int
    max_audio_seconds: float
    max_speech_chars: int
    log_level: str
    log_format: str
    auth: str  # auto (on once a key exists) | on | off
    cors_origins: tuple[str, ...]
    api_key: str  # the key `chipi chat` sends

    @property
    def model_titles(self) -> bool:
        """True when the model proposes a conversation's title after its first reply."""
        return self.auto_title == "model"

    @property
    def conversation_limits(self) -> ConversationLimits:
        return ConversationLimits(self.max_conversation_messages, self.max_conversation_chars)

    @property
    def default_model_requested(self) -> bool:
        """True when the configured model is the offline default that Chipi converts itself."""
        return Path(self.model).resolve() == Path(DEFAULT_MODEL_DIR).resolve()

    @classmethod
    def from_env(cls) -> Settings:
        load_dotenv(Path.cwd() / ".env", override=False)
        dtype = _env_choice("CHIPI_DTYPE", "auto", ("auto", "float32", "bfloat16", "float16"))
        return cls(
            database_url=_env("DATABASE_URL", DEFAULT_DATABASE_URL),
            host=_env("CHIPI_HOST", "127.0.0.1"),
            port=_env_int("CHIPI_PORT", 8000, minimum=1),
            model=_env("CHIPI_MODEL", DEFAULT_MODEL_DIR),
            device=_env("CHIPI_DEVICE", "auto"),
            dtype=dtype,
            quantize=_env_quantize(dtype),
            activation_bits=int(_env_choice("CHIPI_ACTIVATION_BITS", "16", ("16", "8"))),
            kv_cache_dtype=_env_choice("CHIPI_KV_CACHE_DTYPE", "float16", ("float16", "float32")),
            max_new_tokens=_env_int("CHIPI_MAX_NEW_TOKENS", 512, minimum=1),
            temperature=_env_float("CHIPI_TEMPERATURE", 0.2),
            top_p=_env_float("CHIPI_TOP_P", 0.9),
            context_window=_env_int("CHIPI_CONTEXT_WINDOW", 0),
            prefix_cache_mb=_env_int("CHIPI_PREFIX_CACHE_MB", 256),
            max_prompt_chars=_env_int("CHIPI_MAX_PROMPT_CHARS", 16_000, minimum=1),
            # the database's title column holds 255 characters
            max_title_chars=_env_int("CHIPI_MAX_TITLE_CHARS", 200, minimum=1, maximum=255),
            max_body_bytes=_env_int("CHIPI_MAX_BODY_BYTES", 10_000_000, minimum=1024),
            max_conversation_messages=_env_int("CHIPI_MAX_CONVERSATION_MESSAGES", 1000, minimum=2),
            max_conversation_chars=_env_int("CHIPI_MAX_CONVERSATION_CHARS", 1_000_000, minimum=1),
            max_generation_seconds=_env_float("CHIPI_MAX_GENERATION_SECONDS", 300.0),
            rate_limit=_env_int("CHIPI_RATE_LIMIT", 0),
            auto_title=_env_choice("CHIPI_AUTO_TITLE", "model", ("model", "first-message", "off")),
            system_prompt=os.environ.get("CHIPI_SYSTEM_PROMPT", ""),
            stream_flush_seconds=_env_float("CHIPI_STREAM_FLUSH_SECONDS", 0.5),
            stream_event_interval_seconds=_env_float("CHIPI_STREAM_EVENT_INTERVAL_SECONDS", 0.02),
            disconnect_grace_seconds=_env_float("CHIPI_DISCONNECT_GRACE_SECONDS", 30.0),
            max_concurrent_generations=_env_int("CHIPI_MAX_CONCURRENT_GENERATIONS", 8, minimum=1),
            max_queued_generations=_env_int("CHIPI_MAX_QUEUED_GENERATIONS", 16),
            queue_timeout_seconds=_env_float("CHIPI_QUEUE_TIMEOUT_SECONDS", 30.0),
            ws_heartbeat_seconds=_env_float("CHIPI_WS_HEARTBEAT_SECONDS", 20.0, minimum=1.0),
            remote_base_url=os.environ.get("CHIPI_REMOTE_BASE_URL", "").strip(),
            remote_api_key=os.environ.get("CHIPI_REMOTE_API_KEY", "").strip(),
            remote_model=os.environ.get("CHIPI_REMOTE_MODEL", "").strip(),
            remote_timeout_seconds=_env_float("CHIPI_REMOTE_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            stale_stream_seconds=_env_float("CHIPI_STALE_STREAM_SECONDS", 30.0, minimum=1.0),
            database_connect_timeout_seconds=_env_float("CHIPI_DATABASE_CONNECT_TIMEOUT_SECONDS", 5.0, minimum=1.0),
            database_retry_seconds=_env_float("CHIPI_DATABASE_RETRY_SECONDS", 30.0),
            shutdown_grace_seconds=_env_float("CHIPI_SHUTDOWN_GRACE_SECONDS", 10.0),
            whisper_model=_env_name("CHIPI_WHISPER_MODEL", DEFAULT_WHISPER_MODEL),
            voice=_env_name("CHIPI_VOICE", DEFAULT_VOICE),
            max_audio_bytes=_env_int("CHIPI_MAX_AUDIO_BYTES", 25 * 1024 * 1024, minimum=1),
            max_audio_seconds=_env_float("CHIPI_MAX_AUDIO_SECONDS", 600.0, minimum=1.0),
            max_speech_chars=_env_int("CHIPI_MAX_SPEECH_CHARS", 4096, minimum=1),
            log_level=_env("CHIPI_LOG_LEVEL", "info").lower(),
            log_format=_env_choice("CHIPI_LOG_FORMAT", "json", ("json", "text")),
            auth=_env_choice("CHIPI_AUTH", "auto", ("auto", "on", "off")),
            cors_origins=_env_origins("CHIPI_CORS_ORIGINS"),
            api_key=os.environ.get("CHIPI_API_KEY", "").strip(),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return Settings.from_env()
