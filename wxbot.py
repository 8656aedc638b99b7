#!/usr/bin/env python3
"""wxbot: any OpenAI-compatible model behind a WeChat Official Account (公众号).

How a message travels:
  WeChat --POST--> webhook: signature, decryption, XML --> SQLite queue --> answers "success"
  worker thread --> claims the message with a lease --> "Typing" --> model (with the user's turns)
  --> answer and its segments stored --> customer-service API (custom/send), each segment
  marked sent as WeChat confirms it. A crash or restart resumes at the first unsent segment.

Usage:
  python wxbot.py [--env FILE]     serve (settings from the environment and FILE)
  python wxbot.py --help           every setting with its default
Stop with SIGTERM or Ctrl-C: pushes stop being taken, answers in flight finish within
WXBOT_STOP_TIMEOUT seconds, and what was not finished is answered after the next start.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import os
import queue
import random
import re
import signal
import socket
import socketserver
import sqlite3
import struct
import sys
import threading
import time
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ElementTree
from typing import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle
import openai
import requests

__version__ = "0.1.0"

log = logging.getLogger("wxbot")
log_web = logging.getLogger("wxbot.web")
log_worker = logging.getLogger("wxbot.worker")
log_wechat = logging.getLogger("wxbot.wechat")
log_model = logging.getLogger("wxbot.model")


###############################################################################
# Settings ####################################################################
###############################################################################

#: Chinese by default: WeChat users read these lines.
DEFAULT_SYSTEM_PROMPT = (
    "你是微信公众号里的智能助手。请用简洁、友好的中文回答。"
    "微信不显示 Markdown：只输出纯文本，不要使用 #、**、表格或代码块标记，"
    "需要分点时用“1. 2. 3.”或换行即可。"
)
DEFAULT_WELCOME = "你好，欢迎关注！我是 AI 助手，直接发文字给我就能对话。发送 /help 查看用法。"
TEXT_ONLY_LINE = "目前我只能理解文字消息，请直接发送文字。"
APOLOGY_LINE = "抱歉，我暂时无法回答，请稍后再试。"
REFUSED_LINE = "抱歉，这个问题我不方便回答，换个话题吧。"
CUT_OFF_LINE = "（回答中断了，抱歉。可以重新提问。）"
#: Asked when a stream was cut off part-way, so the model completes rather than repeats.
RESUME_PROMPT = "你上面的回答被中断了。请从中断处直接接着写，不要重复已经写过的内容，也不要加开场白。"
CONTINUE_WORDS = ("继续", "繼續", "/more")
RESET_WORDS = ("/reset", "新对话", "清除记忆")
HELP_WORDS = ("/help", "帮助")
RESET_LINE = "好的，之前的对话我已经忘记了，我们重新开始吧。"
HELP_LINE = ("我是 AI 助手，直接发文字或语音给我就能对话。\n"
             "发送“新对话”或 /reset：忘记之前的对话，重新开始\n"
             "回答太长时发送“继续”：查看剩余内容\n"
             "发送“帮助”或 /help：显示这段说明")
VOICE_UNRECOGNISED_LINE = "抱歉，没听清这条语音，请直接打字发给我。"
IMAGE_PROMPT = "请看这张图片，简要说明图里有什么。"
CONTINUE_TAIL = "\n\n（回复“继续”查看剩余内容）"
NOTHING_MORE_LINE = "没有更多内容了，请直接提问吧。"
THINKING_LINE = "正在思考，请稍后回复“继续”获取回答。"
RATE_LINE = "你发得有点快，请 {wait} 秒后再问我。"
DAILY_LINE = "今天的提问次数已用完，请约 {hours} 小时后再来。"
#: Messages a user sends within this many seconds of each other, still waiting when the
#: model is called, are one question split over several messages: asked and answered once.
MERGE_WINDOW = 20.0
#: A question is cut to this many characters before it reaches the model (budget).
MAX_QUESTION_CHARS = 4000
TRUNCATED_NOTE = "\n\n（以上消息过长，已截断，只保留了前 {chars} 字。）"


class SettingsError(Exception):
    """One or more settings are missing or invalid; each problem is one line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _optional_text(value: str) -> str:
    return value.strip()


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {value.strip()!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number
    return parse


def _seconds(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {value.strip()!r}") from None
    if not 0 <= number <= 86400 * 7:
        raise ValueError(f"must be between 0 and 604800 seconds, got {number}")
    return number


def _url(value: str) -> str:
    value = value.strip().rstrip("/")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value


def _optional_url(value: str) -> str:
    return _url(value) if value.strip() else ""


def _url_path(value: str) -> str:
    value = value.strip()
    if not value.startswith("/") or value in ("/healthz",) or any(c in value for c in "?# "):
        raise ValueError(f"must be a path starting with '/' (like /wx), got {value!r}")
    return value


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be 1 or 0, got {value.strip()!r}")


def _aes_key(value: str) -> str:
    value = value.strip()
    if not value:
        return ""
    if len(value) != 43 or not re.fullmatch(r"[A-Za-z0-9+/]{43}", value):
        raise ValueError(
            "must be the 43-character EncodingAESKey from 公众号后台 → 设置与开发 → 基本配置 "
            f"(letters and digits), got {len(value)} characters")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value.strip()!r}")
        return value.strip().lower()
    return parse


def _openids(value: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[\s,]+", value.strip()) if part)


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one setting is read: its variable, default (None: required), parser and help."""

    env: str
    default: str | None
    parse: Callable[[str], object]
    help: str
    secret: bool = False


#: Every setting, in the order --help and the start-up log show them.
SETTINGS: dict[str, Setting] = {
    "token": Setting("WXBOT_TOKEN", None, _text,
                     "Token from 公众号后台 → 服务器配置 (signs every push)", secret=True),
    "appid": Setting("WXBOT_APPID", None, _text, "AppID (开发者ID) of the account"),
    "appsecret": Setting("WXBOT_APPSECRET", None, _text, "AppSecret (开发者密码)", secret=True),
    "aes_key": Setting("WXBOT_AES_KEY", "", _aes_key,
                       "EncodingAESKey, needed for 安全模式/兼容模式 (43 characters)", secret=True),
    "mode": Setting("WXBOT_MODE", "auto", _choice("service", "passive", "auto"),
                    "service: customer-service API; passive: answer in the reply to the "
                    "user's message (unverified accounts); auto: service until WeChat says "
                    "48001, then passive"),
    "api_base": Setting("WXBOT_API_BASE", "https://api.weixin.qq.com", _url,
                        "WeChat API base URL (or a relay whose IP is whitelisted)"),
    "openai_api_key": Setting("OPENAI_API_KEY", None, _text,
                              "model provider's API key (any value for a local Ollama)",
                              secret=True),
    "openai_base_url": Setting("OPENAI_BASE_URL", "", _optional_url,
                               "OpenAI-compatible base URL, e.g. https://api.deepseek.com/v1 "
                               "(empty: OpenAI)"),
    "model": Setting("WXBOT_MODEL", "gpt-4o-mini", _text, "model name"),
    "system_prompt": Setting("WXBOT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, _text,
                             "system prompt (the default asks for plain Chinese text)"),
    "welcome": Setting("WXBOT_WELCOME", DEFAULT_WELCOME, _optional_text,
                       "message sent on subscribe (empty: none)"),
    "admins": Setting("WXBOT_ADMINS", "", _openids,
                      "openids (comma-separated) that may send /stats"),
    "vision": Setting("WXBOT_VISION", "0", _flag,
                      "1: send images to the model (it must accept image input)"),
    "session_ttl": Setting("WXBOT_SESSION_TTL", "86400", _seconds,
                           "earlier turns older than this many seconds are not sent to the model"),
    "db": Setting("WXBOT_DB", "wxbot.db", _text, "SQLite database file"),
    "host": Setting("WXBOT_HOST", "0.0.0.0", _text, "address to listen on"),
    "port": Setting("WXBOT_PORT", "8080", _int_between(0, 65535), "port to listen on"),
    "path": Setting("WXBOT_PATH", "/wx", _url_path, "URL path WeChat calls"),
    "workers": Setting("WXBOT_WORKERS", "4", _int_between(1, 64),
                       "worker threads (model calls in parallel)"),
    "history_turns": Setting("WXBOT_HISTORY_TURNS", "10", _int_between(0, 100),
                             "earlier exchanges (question and answer) sent to the model"),
    "max_skew": Setting("WXBOT_MAX_SKEW", "300", _int_between(0, 86400),
                        "reject pushes whose timestamp is further than this from now, in "
                        "seconds (0: off)"),
    "model_timeout": Setting("WXBOT_MODEL_TIMEOUT", "60", _seconds,
                             "seconds one model call may take"),
    "max_tokens": Setting("WXBOT_MAX_TOKENS", "2000", _int_between(16, 100000),
                          "cap on the tokens of one answer"),
    "user_rate": Setting("WXBOT_USER_RATE", "6", _int_between(0, 10000),
                         "model calls one user may cause per minute (0: no limit)"),
    "user_daily": Setting("WXBOT_USER_DAILY", "200", _int_between(0, 1000000),
                          "model calls one user may cause per 24 h (0: no limit)"),
    "context_chars": Setting("WXBOT_CONTEXT_CHARS", "8000", _int_between(0, 1000000),
                             "earlier turns sent to the model are trimmed to this many characters"),
    "stop_timeout": Setting("WXBOT_STOP_TIMEOUT", "75", _seconds,
                            "seconds to finish answers in flight on SIGTERM (above the model "
                            "timeout)"),
    "retry_base": Setting("WXBOT_RETRY_BASE", "2", _seconds,
                          "first retry delay in seconds; doubles each attempt, with jitter"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings; build with Settings.from_env(mapping)."""

    token: str
    appid: str
    appsecret: str
    aes_key: str
    mode: str
    api_base: str
    openai_api_key: str
    openai_base_url: str
    model: str
    system_prompt: str
    welcome: str
    admins: tuple
    vision: bool
    session_ttl: float
    db: str
    host: str
    port: int
    path: str
    workers: int
    history_turns: int
    max_skew: int
    model_timeout: float
    max_tokens: int
    user_rate: int
    user_daily: int
    context_chars: int
    stop_timeout: float
    retry_base: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Read every setting from env; raise SettingsError listing every problem."""
        values, problems = {}, []
        for name, setting in SETTINGS.items():
            raw = env.get(setting.env)
            if raw is None or (setting.default is None and not raw.strip()):
                if setting.default is None:
                    problems.append(f"{setting.env} is missing: {setting.help}")
                    continue
                raw = setting.default
            try:
                values[name] = setting.parse(raw)
            except ValueError as error:
                problems.append(f"{setting.env} {error}")
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    def secrets(self) -> list[str]:
        """The secret values, for the log filter that keeps them out of every line."""
        return [getattr(self, name) for name, s in SETTINGS.items() if s.secret
                and getattr(self, name)]

    def describe(self) -> str:
        """The effective settings for the start-up log, secrets masked."""
        shown = []
        for name, setting in SETTINGS.items():
            value = getattr(self, name)
            if setting.secret:
                value = "(set)" if value else "(not set)"
            elif name == "admins":
                value = ",".join(short_id(openid) for openid in value)
            elif name in ("system_prompt", "welcome"):
                value = f"({len(value)} chars)"
            shown.append(f"{setting.env}={value}")
        return " ".join(shown)


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, quotes)."""
    values = {}
    with open(path, encoding="utf-8") as env_file:
        for number, line in enumerate(env_file, 1):
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            key, sep, value = line.partition("=")
            key = key.strip()
            if key.startswith("export "):
                key = key[len("export "):].strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise SettingsError([f"{path}:{number}: expected KEY=VALUE, got {line[:40]!r}"])
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
                if line.partition("=")[2].strip()[0] == '"':
                    value = re.sub(r'\\(["\\$`n])',
                                   lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
            values[key] = value
    return values


###############################################################################
# Logging #####################################################################
###############################################################################

class SecretFilter(logging.Filter):
    """Scrubs secrets and access tokens from every log record, whatever put them there."""

    TOKEN_IN_URL = re.compile(r"(access_token=)[^&\s'\"]+")

    def __init__(self):
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 6:
            self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        text = self.TOKEN_IN_URL.sub(r"\1***", text)
        for secret in list(self._secrets):
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = self.scrub(message), None
        return True


#: Installed on the root handlers by main() and by tests; the token client adds new tokens.
SECRET_FILTER = SecretFilter()


def short_id(openid: str) -> str:
    """An openid shortened for the log: enough to tell users apart, not to contact one."""
    return openid if len(openid) <= 10 else f"{openid[:4]}…{openid[-4:]}"


###############################################################################
# What a message is ###########################################################
###############################################################################

class Kind(enum.Enum):
    """What a user's message asks of wxbot."""

    QUESTION = "question"  # for the model: a text, a voice message, a picture, anything else
    CONTINUE = "continue"  # the rest of the most recent answer
    RESET = "reset"        # forget the conversation and the rest of the last answer
    HELP = "help"
    STATS = "stats"        # for admins; an ordinary question for everyone else
    EVENT = "event"        # subscribe, CLICK, LOCATION...: answered as an event, never a question


@dataclasses.dataclass(frozen=True)
class Intent:
    """A message as classify() reads it: its kind, and its text as the user wrote it."""

    kind: Kind
    text: str


#: Surrounding spaces, punctuation and symbols ("继续。", " /reset ", "「帮助」!"); a leading
#: "/" stays, it belongs to the command.
_EDGES = re.compile(r"^(?:[^\w/]|_)+|(?:\W|_)+$")
_ASCII_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


def normalise(text: str) -> str:
    """The form in which a message is compared with the command words: full-width forms folded
    (NFKC: "／ＲＥＳＥＴ" is "/RESET"), surrounding spaces and punctuation dropped, ASCII
    lower-cased."""
    return _EDGES.sub("", unicodedata.normalize("NFKC", text)).translate(_ASCII_LOWER)


#: Each command word, normalised, and the kind of message it makes.
WORDS: dict[str, Kind] = {normalise(word): kind for words, kind in [
    (CONTINUE_WORDS, Kind.CONTINUE), (RESET_WORDS, Kind.RESET), (HELP_WORDS, Kind.HELP),
    (("/stats",), Kind.STATS)] for word in words}


def classify(msg_type: str, content: str | None) -> Intent:
    """What a message is. The one place that decides it: service and passive replies and the
    merging of quick follow-ups all ask here. A spoken command counts as typed."""
    if msg_type == "event":
        return Intent(Kind.EVENT, "")
    text = (content or "").strip()
    kind = WORDS.get(normalise(text)) if msg_type in ("text", "voice") else None
    return Intent(kind or Kind.QUESTION, text)


###############################################################################
# Storage #####################################################################
###############################################################################

class State(str, enum.Enum):
    """Where a stored push is on its way to an answer."""

    QUEUED = "queued"    # waiting for a worker (maybe until not_before, after a failure)
    LEASED = "leased"    # a worker holds it until lease_until
    DONE = "done"        # answered (segments beyond the quota stay stored, unsent)
    FAILED = "failed"    # the model failed; the user got the apology
    DEAD = "dead"        # gave up after repeated delivery failures; kept for the operator


class Leftovers(enum.Enum):
    """What a new message does with the unsent rest of the user's earlier answers."""

    KEEP = "keep"  # leave it for a later "继续" (/help, a notice)
    TAKE = "take"  # "继续": carry the rest of the most recent answer; older rests are dropped
    DROP = "drop"  # a new question, /reset: drop it (kept in the database, never sent)


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,
    dedup_key   TEXT NOT NULL UNIQUE,
    openid      TEXT NOT NULL,
    msg_type    TEXT NOT NULL,
    msg_id      TEXT,
    event       TEXT,
    content     TEXT,
    fields      TEXT NOT NULL,
    received_at REAL NOT NULL,
    pushes      INTEGER NOT NULL DEFAULT 1,
    state       TEXT NOT NULL DEFAULT 'queued'
                CHECK (state IN ({", ".join(repr(s.value) for s in State)})),
    attempts    INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    not_before  REAL NOT NULL DEFAULT 0,
    answered_at REAL,
    merged_into INTEGER REFERENCES messages (id),
    error       TEXT
);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, id);
CREATE INDEX IF NOT EXISTS messages_user ON messages (openid, state, id);

CREATE TABLE IF NOT EXISTS segments (
    message_id INTEGER NOT NULL REFERENCES messages (id),
    seq        INTEGER NOT NULL,
    content    TEXT NOT NULL CHECK (content != ''),
    carried    INTEGER NOT NULL DEFAULT 0,
    tried_at   REAL,
    sent_at    REAL,
    replied_to INTEGER REFERENCES messages (id),
    moved_to   INTEGER REFERENCES messages (id),
    PRIMARY KEY (message_id, seq)
);

CREATE TABLE IF NOT EXISTS turns (
    id         INTEGER PRIMARY KEY,
    openid     TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content    TEXT NOT NULL,
    created_at REAL NOT NULL,
    message_id INTEGER REFERENCES messages (id)
);
CREATE INDEX IF NOT EXISTS turns_user ON turns (openid, id);

CREATE TABLE IF NOT EXISTS model_calls (
    message_id INTEGER PRIMARY KEY REFERENCES messages (id),
    openid     TEXT NOT NULL,
    called_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS model_calls_user ON model_calls (openid, called_at);

CREATE TABLE IF NOT EXISTS kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL
);
"""
SCHEMA_VERSION = 1
#: The user's segments of earlier, finished answers that never went out (:openid, :id).
EARLIER_UNSENT = (" FROM segments s JOIN messages m ON m.id = s.message_id"
                  " WHERE m.openid = :openid AND m.id < :id AND m.state = 'done'"
                  " AND s.sent_at IS NULL AND s.moved_to IS NULL")


@dataclasses.dataclass(frozen=True)
class Message:
    """A claimed message as the worker sees it; `attempts` identifies the lease."""

    id: int
    openid: str
    msg_type: str
    msg_id: str | None
    event: str | None
    content: str | None
    fields: dict
    received_at: float
    attempts: int


class LeaseLost(Exception):
    """The lease expired and the message went back to the queue: stop, another worker has it."""


class Store:
    """The SQLite database: queue, segments, history and the token cache."""

    def __init__(self, path: str, busy_timeout: float = 15.0):
        if sqlite3.sqlite_version_info < (3, 35):  # UPDATE ... RETURNING claims a message
            raise RuntimeError(f"SQLite 3.35 or newer is needed; this Python has "
                               f"{sqlite3.sqlite_version} (use Debian 12 / Ubuntu 22.04 or newer)")
        self.path = path
        self.busy_timeout = busy_timeout
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        # SQLite makes a writer that finds the file locked sleep 1, 2, 5, 10... ms before it
        # tries again; under a burst of pushes that sleep is the ack's p99. Our own writers
        # queue on this lock instead, so only another process can make one wait.
        self._write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[dict] = []
        #: Notified after every write, for webhook threads waiting for a passive reply.
        self.changed = threading.Condition()
        with self.connection() as conn:
            # WAL lets the webhook commit while a worker reads; synchronous=NORMAL keeps every
            # commit through a process crash (kill -9), losing at most the last ones on power loss.
            conn.execute("PRAGMA journal_mode=WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path} was written by a newer wxbot (schema {version})")
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.busy_timeout, cached_statements=32)
        conn.row_factory = sqlite3.Row
        # Another process holding the file (a backup, sqlite3 shell) makes writers wait,
        # not fail: a push is still answered "success" once the lock is gone.
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous=NORMAL")
        # A page cache of 512 KiB a connection (SQLite's default is 2 MiB): the queue's hot
        # pages are few, and a busy webhook holds many connections (RSS under 100 MB).
        conn.execute("PRAGMA cache_size=-512")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection used by one thread at a time, returned to the pool afterwards."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()
            self._pool.put(conn)

    @contextlib.contextmanager
    def _begin(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error; the caller holds the lock."""
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, one writer at a time; waiting webhook threads hear of it."""
        with self._write_lock, self._begin() as conn:
            yield conn
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    # Queue ------------------------------------------------------------------

    def store_push(self, push: "Push", now: float) -> tuple[int, int]:
        """Commit a push once under its dedup key: (message id, times WeChat pushed it).

        Group commit: whichever webhook thread gets the write lock first commits every push
        waiting at that moment in one transaction; the others find theirs done. Under a burst
        that is one commit for many pushes, each still committed before it is acknowledged.
        """
        ticket = {"push": push, "now": now}
        with self._pending_lock:
            self._pending.append(ticket)
        with self._write_lock:
            if "stored" not in ticket:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._commit_pushes(batch)
        if isinstance(ticket["stored"], Exception):
            raise ticket["stored"]
        return ticket["stored"]

    def _commit_pushes(self, batch: list[dict]) -> None:
        try:
            with self._begin() as conn:
                for ticket in batch:
                    push = ticket["push"]
                    ticket["stored"] = tuple(conn.execute(
                        "INSERT INTO messages (dedup_key, openid, msg_type, msg_id, event,"
                        " content, fields, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (dedup_key) DO UPDATE SET pushes = pushes + 1"
                        " RETURNING id, pushes",
                        (push.dedup_key, push.openid, push.msg_type, push.msg_id, push.event,
                         push.content,
                         # A text's fields are all in the columns: the hot path skips the JSON.
                         "{}" if push.msg_type == "text" else
                         json.dumps(push.fields, ensure_ascii=False), ticket["now"])
                    ).fetchone())
        except sqlite3.Error as error:
            for ticket in batch:
                ticket["stored"] = error

    def claim(self, now: float, lease_seconds: float) -> Message | None:
        """Lease the oldest message whose user has nothing earlier queued or in hand."""
        with self.transaction() as conn:
            conn.execute("UPDATE messages SET state = 'queued' WHERE state = 'leased'"
                         " AND lease_until < :now", {"now": now})
            row = conn.execute(
                "UPDATE messages SET state = 'leased', lease_until = :until,"
                " attempts = attempts + 1"
                " WHERE id = (SELECT m.id FROM messages m WHERE m.state = 'queued'"
                "   AND m.not_before <= :now"
                "   AND NOT EXISTS (SELECT 1 FROM messages o WHERE o.openid = m.openid"
                "     AND o.state IN ('queued', 'leased') AND (o.id < m.id OR o.state = 'leased'))"
                "   ORDER BY m.id LIMIT 1)"
                " RETURNING id, openid, msg_type, msg_id, event, content, fields, received_at,"
                " attempts", {"now": now, "until": now + lease_seconds}).fetchone()
        if row is None:
            return None
        return Message(**{**dict(row), "fields": json.loads(row["fields"])})

    def next_due(self, now: float) -> float | None:
        """When a message that cannot be claimed now may become claimable: a retry's time or a
        lease's end. (A message waiting behind its user's message in hand becomes claimable
        when that one finishes, and the worker that finishes it wakes the others.)"""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT min(CASE state WHEN 'queued' THEN not_before ELSE lease_until END)"
                " FROM messages WHERE state = 'leased' OR (state = 'queued' AND not_before > ?)",
                (now,)).fetchone()
        return row[0]

    def _leased(self, conn: sqlite3.Connection, message: Message, sql: str, **params) -> None:
        """Run an UPDATE on the message only while the caller still holds its lease."""
        cursor = conn.execute(
            sql + " WHERE id = :id AND state = 'leased' AND attempts = :attempts",
            {"id": message.id, "attempts": message.attempts, **params})
        if cursor.rowcount != 1:
            raise LeaseLost(message.id)

    def _check_lease(self, conn: sqlite3.Connection, message: Message) -> None:
        """Raise LeaseLost unless the caller still holds the message's lease."""
        self._leased(conn, message, "UPDATE messages SET lease_until = lease_until")

    def mark_trying(self, message: Message, seq: int, now: float, lease_until: float) -> None:
        """Note that a segment is about to be sent, renewing the lease that allows it."""
        with self.transaction() as conn:
            self._leased(conn, message, "UPDATE messages SET lease_until = :until",
                         until=lease_until)
            conn.execute("UPDATE segments SET tried_at = ? WHERE message_id = ? AND seq = ?",
                         (now, message.id, seq))

    def release(self, message: Message, not_before: float, error: str) -> None:
        """Put the message back in the queue, to be tried again from not_before."""
        with self.transaction() as conn:
            self._leased(conn, message, "UPDATE messages SET state = 'queued', lease_until = NULL,"
                         " not_before = :not_before, error = :error",
                         not_before=not_before, error=error)

    def finish(self, message: Message, state: State, error: str | None = None) -> None:
        with self.transaction() as conn:
            self._leased(conn, message, "UPDATE messages SET state = :state, lease_until = NULL,"
                         " error = :error", state=state.value, error=error)

    def release_all_leases(self) -> int:
        """Put every leased message back: called at start and stop, when no worker runs."""
        with self.transaction() as conn:
            return conn.execute("UPDATE messages SET state = 'queued', lease_until = NULL"
                                " WHERE state = 'leased'").rowcount

    # Answers ----------------------------------------------------------------

    def start_answer(self, message: Message, carry: bool = True,
                     leftovers: Leftovers = Leftovers.KEEP) -> None:
        """Put what the user is still owed at the front of this message's answer.

        Carried always: answers a quota or window error interrupted (45047, 45015), and
        answers none of which went out yet (a passive reply nobody fetched, a 48001). The
        rest of an answer that went out in part (beyond the 5-message quota, or one passive
        reply) is a leftover, for "继续" only: `leftovers` says what this message does with
        them (Leftovers). This message's 5 messages then carry them. Events (carry=False)
        open no quota that could. Done once per message.
        """
        with self.transaction() as conn:
            self._start_answer(conn, message, carry, leftovers)

    def _start_answer(self, conn: sqlite3.Connection, message: Message, carry: bool,
                      leftovers: Leftovers) -> int:
        self._check_lease(conn, message)
        if not carry or conn.execute("SELECT 1 FROM segments WHERE message_id = ? LIMIT 1",
                                     (message.id,)).fetchone():
            return 0
        earlier = conn.execute(
            "SELECT s.message_id, s.seq, s.content, m.msg_type, m.error, EXISTS (SELECT 1"
            " FROM segments o WHERE o.message_id = m.id AND o.sent_at IS NOT NULL) AS begun"
            + EARLIER_UNSENT + " ORDER BY m.id, s.seq",
            {"openid": message.openid, "id": message.id}).fetchall()
        left = [row for row in earlier if row["error"] is None and row["begun"]]
        latest = left[-1]["message_id"] if left and leftovers is Leftovers.TAKE else None
        carried = [row for row in earlier if row["error"] in ("errcode 45047", "errcode 45015")
                   or (row["error"] is None and row["msg_type"] != "event" and
                       (not row["begun"] or row["message_id"] == latest))]
        # A superseded leftover is kept, never sent: moved_to names the message that
        # superseded it, and no copy is made.
        dropped = [row for row in left if row["message_id"] != latest] \
            if leftovers is not Leftovers.KEEP else []
        conn.executemany("UPDATE segments SET moved_to = ? WHERE message_id = ? AND seq = ?",
                         [(message.id, row[0], row[1]) for row in carried + dropped])
        conn.executemany("INSERT INTO segments (message_id, seq, content, carried)"
                         " VALUES (?, ?, ?, 1)",
                         [(message.id, seq, row[2]) for seq, row in enumerate(carried)])
        return len(carried)

    def add_segments(self, message: Message, segments: list[str]) -> None:
        """Append planned segments to the message's answer (durable before they are sent)."""
        with self.transaction() as conn:
            self._add_segments(conn, message, segments)

    def _add_segments(self, conn: sqlite3.Connection, message: Message,
                      segments: list[str]) -> None:
        self._check_lease(conn, message)
        first = conn.execute("SELECT coalesce(max(seq) + 1, 0) FROM segments"
                             " WHERE message_id = ?", (message.id,)).fetchone()[0]
        conn.executemany("INSERT INTO segments (message_id, seq, content) VALUES (?, ?, ?)",
                         [(message.id, first + n, text) for n, text in enumerate(segments)])

    def complete_answer(self, message: Message, now: float, segments: list[str] = (),
                        question: str | None = None, answer: str | None = None) -> int:
        """Add the last segments, mark the answer complete and keep the exchange as history.

        Returns the number of segments the message has to send.
        """
        with self.transaction() as conn:
            return self._complete_answer(conn, message, now, segments, question, answer)

    def _complete_answer(self, conn: sqlite3.Connection, message: Message, now: float,
                         segments: list[str], question: str | None, answer: str | None) -> int:
        self._add_segments(conn, message, list(segments))
        conn.execute("UPDATE messages SET answered_at = ? WHERE id = ?", (now, message.id))
        if question is not None and answer:
            conn.executemany(
                "INSERT INTO turns (openid, role, content, created_at, message_id)"
                " VALUES (?, ?, ?, ?, ?)",
                [(message.openid, "user", question, message.received_at, message.id),
                 (message.openid, "assistant", answer, now, message.id)])
        return conn.execute("SELECT count(*) FROM segments WHERE message_id = ?"
                            " AND moved_to IS NULL", (message.id,)).fetchone()[0]

    def save_answer(self, message: Message, segments: list[str], now: float,
                    carry: bool = True, leftovers: Leftovers = Leftovers.KEEP,
                    if_nothing: list[str] = ()) -> int:
        """A whole reply that needs no model (a line, a notice, "继续"), in one commit;
        `if_nothing` is the reply when nothing else, carried or given, is to be sent."""
        with self.transaction() as conn:
            if not self._start_answer(conn, message, carry, leftovers) and not segments:
                segments = if_nothing
            return self._complete_answer(conn, message, now, segments, None, None)

    def partial_answer(self, message_id: int) -> str:
        """What a stream cut off by a failure or a crash had already produced."""
        with self.connection() as conn:
            rows = conn.execute("SELECT content FROM segments WHERE message_id = ?"
                                " AND carried = 0 ORDER BY seq", (message_id,)).fetchall()
        return "\n\n".join(row[0] for row in rows)

    def merge_followups(self, message: Message, now: float) -> list[str]:
        """Texts the user sent right after this one and that still wait: asked together.

        Phones split one question over several quick messages; they get one answer.
        Returns every text merged into this message so far, oldest first.
        """
        with self.transaction() as conn:
            self._check_lease(conn, message)
            waiting = conn.execute(
                "SELECT id, msg_type, content, received_at FROM messages WHERE openid = ?"
                " AND id > ? AND state = 'queued' AND not_before <= ? ORDER BY id",
                (message.openid, message.id, now)).fetchall()
            merged, previous = [], message.received_at
            for row in waiting:  # up to the first that is no quick question typed
                if row["msg_type"] != "text" or not (row["content"] or "").strip() or \
                        classify(row["msg_type"], row["content"]).kind is not Kind.QUESTION \
                        or row["received_at"] - previous > MERGE_WINDOW:
                    break
                merged.append(row["id"])
                previous = row["received_at"]
            conn.executemany("UPDATE messages SET state = 'done', merged_into = ?,"
                             " answered_at = ? WHERE id = ?",
                             [(message.id, now, merged_id) for merged_id in merged])
            return [row[0] for row in conn.execute(
                "SELECT content FROM messages WHERE merged_into = ? ORDER BY id",
                (message.id,))]

    def passive_reply(self, openid: str, message_id: int, now: float
                      ) -> tuple[str, bool] | None:
        """The segment the reply to this push carries, and whether more waits after it.

        The same push retried gets the same segment; otherwise the next unsent segment of
        this message's own answer (which carries what the user was still owed), or of the
        answer it was merged into. An event never takes another message's answer.
        """
        with self.transaction() as conn:
            row = conn.execute("SELECT message_id, seq, content FROM segments"
                               " WHERE replied_to = ?", (message_id,)).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT message_id, seq, content FROM segments WHERE message_id ="
                    " (SELECT coalesce(merged_into, id) FROM messages WHERE id = ?)"
                    " AND sent_at IS NULL AND moved_to IS NULL ORDER BY seq LIMIT 1",
                    (message_id,)).fetchone()
                if row is None:
                    return None
                conn.execute("UPDATE segments SET sent_at = ?, replied_to = ?"
                             " WHERE message_id = ? AND seq = ?", (now, message_id, row[0], row[1]))
            # More: a segment waiting, or a question of the user still being answered.
            more = conn.execute(
                "SELECT 1 FROM segments s JOIN messages m ON m.id = s.message_id"
                " WHERE m.openid = ? AND s.sent_at IS NULL AND s.moved_to IS NULL LIMIT 1",
                (openid,)).fetchone() is not None or any(
                classify(*waiting).kind is Kind.QUESTION for waiting in conn.execute(
                    "SELECT msg_type, content FROM messages WHERE openid = ?"
                    " AND state IN ('queued', 'leased') AND answered_at IS NULL", (openid,)))
        return row[2], more

    def settled(self, message_id: int) -> bool:
        """Whether a message is answered (or needs no answer): nothing more will come of it."""
        with self.connection() as conn:
            row = conn.execute("SELECT state FROM messages WHERE id = ?",
                               (message_id,)).fetchone()
        return row is not None and row[0] not in ("queued", "leased")

    def answer_complete(self, message_id: int) -> bool:
        with self.connection() as conn:
            return conn.execute("SELECT answered_at FROM messages WHERE id = ?",
                                (message_id,)).fetchone()[0] is not None

    def segments(self, message_id: int) -> list[sqlite3.Row]:
        with self.connection() as conn:
            return conn.execute("SELECT seq, content, tried_at, sent_at FROM segments"
                                " WHERE message_id = ?"
                                " AND moved_to IS NULL ORDER BY seq", (message_id,)).fetchall()

    def mark_sent(self, message: Message, seq: int, now: float) -> None:
        with self.transaction() as conn:
            self._check_lease(conn, message)
            conn.execute("UPDATE segments SET sent_at = ? WHERE message_id = ? AND seq = ?",
                         (now, message.id, seq))

    def history(self, openid: str, turns: int, max_chars: int, since: float = 0) -> list[dict]:
        """The user's last `turns` exchanges since `since`, oldest first, within max_chars."""
        with self.connection() as conn:
            rows = conn.execute("SELECT role, content FROM turns WHERE openid = ?"
                                " AND created_at >= ? ORDER BY id DESC LIMIT ?",
                                (openid, since, turns * 2)).fetchall()
        kept, chars = [], 0
        for row in rows:  # newest first: the oldest turns are the ones dropped
            chars += len(row["content"])
            if chars > max_chars:
                break
            kept.append({"role": row["role"], "content": row["content"]})
        while kept and kept[-1]["role"] != "user":  # start the history with a question
            kept.pop()
        return kept[::-1]

    def forget(self, openid: str) -> int:
        """Delete the user's conversation history (/reset): it is never sent to the model again."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM turns WHERE openid = ?", (openid,)).rowcount

    def stats(self, now: float) -> dict:
        """For /stats: today's traffic and the model's latency (since midnight, local time)."""
        midnight = time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
        with self.connection() as conn:
            row = conn.execute(
                "SELECT count(*), sum(state = 'failed'), sum(state = 'dead'),"
                " avg(answered_at - received_at) FROM messages WHERE received_at >= ?"
                " AND msg_type != 'event'", (midnight,)).fetchone()
            token = conn.execute("SELECT expires_at FROM kv WHERE key = 'access_token'"
                                 ).fetchone()
        return {**self.health(now), "today": row[0], "failed_today": row[1] or 0,
                "dead_today": row[2] or 0, "answer_seconds_avg": round(row[3] or 0, 2),
                "token_valid_s": round(token[0] - now) if token else None}

    def count_model_call(self, message: Message, now: float, windows: list[tuple[float, int]]
                         ) -> float | None:
        """Record the model call a message causes, unless a (seconds, limit) window is full.

        Returns None when the call may go ahead (a retry of the same message counts once),
        else how many seconds until the fullest window frees a place.
        """
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM model_calls WHERE message_id = ?",
                            (message.id,)).fetchone():
                return None
            for seconds, limit in windows:
                if not limit:
                    continue
                calls = conn.execute(
                    "SELECT called_at FROM model_calls WHERE openid = ? AND called_at > ?"
                    " ORDER BY called_at DESC LIMIT ?",
                    (message.openid, now - seconds, limit)).fetchall()
                if len(calls) >= limit:
                    return calls[-1][0] + seconds - now
            conn.execute("INSERT INTO model_calls (message_id, openid, called_at) VALUES"
                         " (?, ?, ?)", (message.id, message.openid, now))
        return None

    # Key-value (the access token) -------------------------------------------

    def get_kv(self, key: str, now: float) -> str | None:
        with self.connection() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ? AND (expires_at IS NULL"
                               " OR expires_at > ?)", (key, now)).fetchone()
        return row[0] if row else None

    def set_kv(self, key: str, value: str, expires_at: float | None) -> None:
        with self._write_lock, self.connection() as conn:
            conn.execute("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                         (key, value, expires_at))

    # Health -----------------------------------------------------------------

    def health(self, now: float) -> dict:
        with self.connection() as conn:
            counts = dict(conn.execute("SELECT state, count(*) FROM messages"
                                       " GROUP BY state").fetchall())
            oldest = conn.execute("SELECT min(received_at) FROM messages"
                                  " WHERE state IN ('queued', 'leased')").fetchone()[0]
            unsent = conn.execute("SELECT count(*) FROM segments WHERE sent_at IS NULL"
                                  " AND moved_to IS NULL").fetchone()[0]
        return {
            "queued": counts.get("queued", 0) + counts.get("leased", 0),
            "in_progress": counts.get("leased", 0),
            "oldest_queued_age_s": round(now - oldest, 3) if oldest else 0,
            "answered": counts.get("done", 0),
            "failed": counts.get("failed", 0),
            "dead": counts.get("dead", 0),
            "unsent_segments": unsent,
        }


###############################################################################
# WeChat protocol: signatures, encryption, XML ################################
###############################################################################

class BadPush(Exception):
    """A push that is not a well-formed WeChat message; answered 400 and never stored."""


class Forbidden(Exception):
    """A request that fails a signature, age or AppID check; answered 403."""


def wechat_signature(*parts: str) -> str:
    """sha1 of the parts sorted as strings and joined (WECHAT.md §1, §2)."""
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def check_signature(token: str, query: Mapping[str, str], now: float, max_skew: int) -> None:
    """Raise Forbidden unless the query's signature is valid and its timestamp is fresh."""
    signature, timestamp, nonce = (query.get(k, "") for k in ("signature", "timestamp", "nonce"))
    if not (signature and timestamp and nonce):
        raise Forbidden("signature, timestamp or nonce missing")
    if not hmac.compare_digest(wechat_signature(token, timestamp, nonce).encode(),
                               signature.lower().encode("utf-8", "replace")):
        raise Forbidden("signature does not match WXBOT_TOKEN")
    check_timestamp(timestamp, now, max_skew)


def check_timestamp(timestamp: str, now: float, max_skew: int) -> None:
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise Forbidden("timestamp is not a number")
    if max_skew and abs(now - int(timestamp)) > max_skew:
        raise Forbidden(f"timestamp is {int(now - int(timestamp))} s from now "
                        f"(over WXBOT_MAX_SKEW={max_skew}; is this server's clock right?)")


class WeChatCrypto:
    """WXBizMsgCrypt framing: AES-256-CBC, IV = key[:16], PKCS#7 over 32-byte blocks.

    plaintext = 16 random bytes + 4-byte big-endian length + xml + appid (WECHAT.md §2).
    """

    BLOCK = 32

    def __init__(self, aes_key: str, appid: str):
        # Imported here: only 安全模式 and 兼容模式 need the cryptography package.
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        self.key = base64.b64decode(aes_key + "=")
        if len(self.key) != 32:
            raise ValueError("EncodingAESKey must decode to 32 bytes")
        self.appid = appid.encode("utf-8")
        self._cipher = Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16]))

    def encrypt(self, xml: bytes, random_prefix: bytes | None = None) -> str:
        body = (random_prefix or os.urandom(16)) + struct.pack(">I", len(xml)) + xml + self.appid
        pad = self.BLOCK - len(body) % self.BLOCK
        encryptor = self._cipher.encryptor()
        return base64.b64encode(encryptor.update(body + bytes([pad]) * pad)
                                + encryptor.finalize()).decode("ascii")

    def decrypt(self, encrypted: str) -> bytes:
        """The inner XML; raises Forbidden when the ciphertext, padding or AppID is wrong."""
        try:
            data = base64.b64decode(encrypted, validate=True)
        except ValueError:
            raise Forbidden("Encrypt is not base64") from None
        if not data or len(data) % 16:
            raise Forbidden("Encrypt has the wrong length")
        decryptor = self._cipher.decryptor()
        plain = decryptor.update(data) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= self.BLOCK or plain[-pad:] != bytes([pad]) * pad:
            raise Forbidden("bad padding: is WXBOT_AES_KEY the account's EncodingAESKey?")
        plain = plain[:-pad]
        if len(plain) < 20:
            raise Forbidden("decrypted message too short")
        length = struct.unpack(">I", plain[16:20])[0]
        xml, appid = plain[20:20 + length], plain[20 + length:]
        if len(xml) != length:
            raise Forbidden("decrypted length field is wrong")
        if not hmac.compare_digest(appid, self.appid):
            raise Forbidden("decrypted AppID does not match WXBOT_APPID")
        return xml

    def reply(self, token: str, xml: bytes, timestamp: str, nonce: str) -> bytes:
        """An encrypted passive reply: <xml><Encrypt/><MsgSignature/><TimeStamp/><Nonce/></xml>."""
        encrypted = self.encrypt(xml)
        signature = wechat_signature(token, timestamp, nonce, encrypted)
        return (f"<xml><Encrypt><![CDATA[{encrypted}]]></Encrypt>"
                f"<MsgSignature><![CDATA[{signature}]]></MsgSignature>"
                f"<TimeStamp>{timestamp}</TimeStamp>"
                f"<Nonce><![CDATA[{nonce}]]></Nonce></xml>").encode("utf-8")


#: WeChat's XML is one flat <xml> of short fields; anything else is refused before parsing.
MAX_FIELDS = 64
DECLARATION = re.compile(rb"<!(?!\[CDATA\[)")


def parse_xml(body: bytes) -> dict[str, str]:
    """The fields of a flat <xml> push. No DOCTYPE or entity is ever read (billion laughs, XXE)."""
    if DECLARATION.search(body):
        raise BadPush("XML declarations (DOCTYPE, ENTITY) are not allowed")
    try:
        root = ElementTree.fromstring(body)
    except (ElementTree.ParseError, ValueError) as error:
        raise BadPush(f"malformed XML: {error}") from None
    if root.tag != "xml":
        raise BadPush(f"root element is <{root.tag[:20]}>, expected <xml>")
    if len(root) > MAX_FIELDS:
        raise BadPush("too many fields")
    fields = {}
    for child in root:
        if len(child) and child.tag not in ("ScanCodeInfo", "SendPicsInfo", "SendLocationInfo"):
            raise BadPush(f"<{child.tag[:20]}> is nested")
        fields[child.tag] = (child.text or "").strip() if not len(child) else ""
    return fields


@dataclasses.dataclass(frozen=True)
class Push:
    """One push from WeChat, validated: a message (with MsgId) or an event."""

    openid: str
    account: str
    msg_type: str
    create_time: str
    msg_id: str | None
    event: str | None
    content: str | None
    fields: dict

    @property
    def dedup_key(self) -> str:
        # MsgIds can collide across users; events have no MsgId (WECHAT.md §3).
        if self.msg_id is not None:
            return f"m:{self.openid}:{self.msg_id}"
        return f"e:{self.openid}:{self.create_time}:{self.event}:{self.fields.get('EventKey', '')}"

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Push":
        openid, account = fields.get("FromUserName", ""), fields.get("ToUserName", "")
        msg_type, create_time = fields.get("MsgType", ""), fields.get("CreateTime", "")
        if not openid or len(openid) > 128:
            raise BadPush("FromUserName missing")
        if not msg_type or len(msg_type) > 32:
            raise BadPush("MsgType missing")
        if not create_time.isdigit() or len(create_time) > 12:
            raise BadPush("CreateTime is not a number")
        msg_id, event = None, None
        if msg_type == "event":
            event = fields.get("Event", "")
            if not event:
                raise BadPush("event without Event")
        else:
            msg_id = fields.get("MsgId", "")
            if not msg_id.isdigit() or len(msg_id) > 20:
                raise BadPush("MsgId is not a number")
        if msg_type == "text":
            content = fields.get("Content", "")
        elif msg_type == "voice":
            content = fields.get("Recognition", "")
        else:
            content = None
        return cls(openid, account, msg_type, create_time, msg_id, event, content, fields)


###############################################################################
# WeChat API client ###########################################################
###############################################################################

#: What the operator should do about a return code (WECHAT.md §5, §6).
HINTS = {
    40164: "add this server's IP ({ip}) to 公众号后台 → 设置与开发 → 基本配置 → IP白名单",
    40013: "WXBOT_APPID is wrong: copy the AppID from 公众号后台 → 设置与开发 → 基本配置",
    40125: "WXBOT_APPSECRET is wrong: reset and copy it in 公众号后台 → 设置与开发 → 基本配置",
    40243: "the AppSecret is frozen: unfreeze it in 公众号后台 → 设置与开发 → 基本配置",
    48001: "this account may not use the customer-service API (only verified accounts, or "
           "the 测试号 sandbox, can): verify the account",
    45047: "the user's 5 messages per question are used up; the rest waits for their next message",
    45015: "the user has not written in 48 h or unfollowed; the answer stays stored",
}
TOKEN_INVALID = {40001, 40014, 42001}

#: The message cannot be delivered now; keep what is unsent and move on (WECHAT.md §6).
GIVE_UP = {40003, 43004, 45015, 45047, 48001}


class WeChatError(Exception):
    """WeChat answered with a non-zero errcode, or not at all (errcode None)."""

    def __init__(self, errcode: int | None, errmsg: str):
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode, self.errmsg = errcode, errmsg

    def ip(self) -> str | None:
        """The server IP WeChat names in a 40164 ("invalid ip 1.2.3.4 ..., not in whitelist")."""
        found = re.search(r"invalid ip ([0-9a-fA-F.:]+)", self.errmsg or "")
        return found.group(1) if found else None

    def hint(self) -> str:
        template = HINTS.get(self.errcode, "")
        if "{ip}" in template:
            template = template.format(ip=self.ip() or "see errmsg")
        return f"{self} — {template}" if template else str(self)


class WeChatAPI:
    """Calls to WeChat's API with an access token cached in SQLite across restarts."""

    #: Refresh this long before WeChat says the token expires.
    REFRESH_AHEAD = 300.0

    def __init__(self, settings: Settings, store: Store, timeout: float = 10.0):
        self.settings, self.store, self.timeout = settings, store, timeout
        self._lock = threading.Lock()  # one token refresh at a time
        self._local = threading.local()
        self._reported: set[int] = set()
        self._reported_lock = threading.Lock()

    def first_time(self, errcode: int) -> bool:
        """False for an account-wide error already logged (48001 would flood the log)."""
        if errcode != 48001:
            return True
        with self._reported_lock:  # not the token lock: that one is held across a fetch
            first = errcode not in self._reported
            self._reported.add(errcode)
        return first

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, path: str, body: dict, params: dict | None = None) -> dict:
        """POST JSON as raw UTF-8 (escapes can fail with 40033); raise WeChatError on failure."""
        url = self.settings.api_base + path
        try:
            response = self._session().post(
                url, params=params, timeout=self.timeout,
                data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                headers={"Content-Type": "application/json; charset=utf-8"})
        except requests.RequestException as error:
            raise WeChatError(None, f"{type(error).__name__} calling {path}") from None
        if response.status_code != 200:
            raise WeChatError(None, f"HTTP {response.status_code} from {path}")
        try:
            answer = response.json()
        except ValueError:
            raise WeChatError(None, f"{path} answered something that is not JSON") from None
        errcode = answer.get("errcode", 0)
        if errcode:
            raise WeChatError(errcode, str(answer.get("errmsg", ""))[:200])
        return answer

    def access_token(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        token = self.store.get_kv("access_token", now + self.REFRESH_AHEAD)
        if token:
            SECRET_FILTER.add(token)
            return token
        with self._lock:  # one refresh at a time; the others use what it fetched
            token = self.store.get_kv("access_token", now + self.REFRESH_AHEAD)
            return token or self._fetch_token(force=False)

    def _fetch_token(self, force: bool) -> str:
        answer = self._post("/cgi-bin/stable_token", {
            "grant_type": "client_credential", "appid": self.settings.appid,
            "secret": self.settings.appsecret, "force_refresh": force})
        token, expires_in = answer.get("access_token"), answer.get("expires_in", 7200)
        if not isinstance(token, str) or not token:
            raise WeChatError(None, "stable_token answered without access_token")
        SECRET_FILTER.add(token)
        self.store.set_kv("access_token", token, time.time() + float(expires_in))
        log_wechat.info("fetched a new access token (valid %s s)", expires_in)
        return token

    def refresh_token(self, rejected: str) -> str:
        """Replace a token WeChat rejected; threads that hit the same token share one refresh."""
        with self._lock:
            token = self.store.get_kv("access_token", time.time())
            if token and token != rejected:
                return token
            token = self._fetch_token(force=False)
            if token == rejected:  # stable_token still deems it valid: ask for a new one
                token = self._fetch_token(force=True)
            return token

    def call(self, path: str, body: dict) -> dict:
        """An authenticated call; on 40001, 40014 or 42001 refresh the token once and retry once."""
        token = self.access_token()
        try:
            return self._post(path, body, {"access_token": token})
        except WeChatError as error:
            if error.errcode not in TOKEN_INVALID:
                raise
            log_wechat.warning("access token rejected (%s); refreshing once", error.errcode)
        return self._post(path, body, {"access_token": self.refresh_token(token)})

    def customer_service_send(self, openid: str, text: str) -> None:
        self.call("/cgi-bin/message/custom/send",
                  {"touser": openid, "msgtype": "text", "text": {"content": text}})

    def typing_soon(self, openid: str) -> None:
        """Show "typing" from another thread, so the model call need not wait for WeChat."""
        thread = threading.Thread(target=self.typing, args=(openid,), daemon=True)
        thread.start()

    def typing(self, openid: str, command: str = "Typing") -> None:
        """Show "typing"; every error is harmless (45080 too late, 45081 already shown)."""
        try:
            self.call("/cgi-bin/message/custom/typing", {"touser": openid, "command": command})
        except WeChatError as error:
            log_wechat.debug("typing for %s not shown: %s", short_id(openid), error)


class DeliveryMode:
    """Whether answers go out through the customer-service API or as passive replies.

    Unverified accounts may not use the customer-service API (48001). With WXBOT_MODE=auto
    the first 48001 switches to passive replies, remembered in the database.
    """

    def __init__(self, setting: str, store: Store):
        self.setting, self.store = setting, store
        self.passive = setting == "passive" or (
            setting == "auto" and store.get_kv("mode", 0) == "passive")

    def no_permission(self) -> bool:
        """WeChat said 48001; True when that switched wxbot to passive replies."""
        if self.setting != "auto" or self.passive:
            return False
        self.passive = True
        self.store.set_kv("mode", "passive", None)
        log_wechat.warning("WeChat refuses the customer-service API (48001: the account is not "
                           "verified). Switching to passive replies for good (WXBOT_MODE=auto): "
                           "each answer now goes out in the reply to the user's message.")
        return True


###############################################################################
# Model client ################################################################
###############################################################################

class ModelError(Exception):
    """The model gave no usable answer. kind: "transient" (try again later), "context" (the
    conversation is too long), "refused" (a content filter), or "fatal" (a setting is wrong)."""

    def __init__(self, reason: str, kind: str = "transient", retry_after: float | None = None,
                 status: int | None = None, detail: str = ""):
        super().__init__(reason)
        self.kind, self.retry_after, self.status, self.detail = kind, retry_after, status, detail


#: How providers say a request was too long, or blocked by their content filter (HTTP 400).
CONTEXT_TOO_LONG = re.compile(r"context.length|context_length|maximum context|too long|"
                              r"max_tokens|tokens? limit|超出|过长", re.I)
CONTENT_FILTER = re.compile(r"content.filter|content_filter|content management|"
                            r"data_inspection|inappropriate|sensitive|risk|违规|敏感", re.I)


class Model:
    """An OpenAI-compatible chat.completions endpoint (OpenAI, DeepSeek, Qwen, Ollama, ...)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = openai.OpenAI(api_key=settings.openai_api_key,
                                    base_url=settings.openai_base_url or None,
                                    timeout=settings.model_timeout, max_retries=0)

    def answer(self, messages: list[dict], max_tokens: int | None = None) -> str:
        try:
            completion = self.client.chat.completions.create(
                model=self.settings.model, messages=messages,
                max_tokens=max_tokens or self.settings.max_tokens)
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise ModelError(f"{type(error).__name__}: cannot reach the model at "
                             f"{self.client.base_url}") from None
        choice = completion.choices[0] if completion.choices else None
        text = (choice.message.content or "").strip() if choice and choice.message else ""
        if not text and choice and choice.finish_reason == "content_filter":
            raise ModelError("the model's content filter stopped the answer", "refused")
        if not text:
            raise ModelError("the model returned an empty answer")
        return text

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """The answer's text as the model writes it; one piece where streaming is not offered."""
        try:
            chunks = self.client.chat.completions.create(
                model=self.settings.model, messages=messages,
                max_tokens=self.settings.max_tokens, stream=True)
        except openai.APIStatusError as error:
            if error.status_code == 400 and "stream" in str(error.message).lower():
                yield self.answer(messages)
                return
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise ModelError(f"{type(error).__name__}: cannot reach the model at "
                             f"{self.client.base_url}") from None
        produced = finished = False
        with contextlib.closing(chunks):
            try:
                for chunk in chunks:
                    choice = chunk.choices[0] if chunk.choices else None
                    text = choice.delta.content if choice and choice.delta else None
                    if text:
                        produced = True
                        yield text
                    if choice and choice.finish_reason == "content_filter":
                        raise ModelError("the model's content filter stopped the answer",
                                         "refused")
                    finished |= bool(choice and choice.finish_reason)
            except ModelError:
                raise
            except Exception as error:  # the stream broke off: network, timeout, bad chunk
                raise ModelError(f"the answer stream broke off ({type(error).__name__})"
                                 ) from None
        if not produced:  # a provider that ignored stream=True, or sent nothing
            yield self.answer(messages)
        elif not finished:  # the connection ended without the model saying it was done
            raise ModelError("the answer stream ended before the answer was finished")

    def _status_error(self, error: openai.APIStatusError) -> ModelError:
        status = error.status_code
        hint = {401: "check OPENAI_API_KEY", 403: "check OPENAI_API_KEY and the account",
                404: f"check WXBOT_MODEL ({self.settings.model}) and OPENAI_BASE_URL"}
        retry_after = None
        with contextlib.suppress(TypeError, ValueError):
            retry_after = float(error.response.headers.get("retry-after"))
        detail = str(getattr(error, "message", "") or "")[:300]
        kind = "transient" if status in (408, 409, 429) or status >= 500 else "fatal"
        if status == 400 and CONTEXT_TOO_LONG.search(detail):
            kind = "context"
        elif status == 400 and CONTENT_FILTER.search(detail):
            kind = "refused"
        return ModelError(f"HTTP {status} from the model: {hint.get(status, 'provider error')}"
                          f" ({kind})", kind, retry_after, status, detail)


###############################################################################
# Reply shaping: segments #####################################################
###############################################################################

#: WeChat's practical limit for one customer-service text (45002 above it).
SEGMENT_BYTES = 2048
#: Customer-service messages allowed per user message within 48 h (45047).
QUOTA = 5
#: Every segment leaves room for the "继续" line, which the 5th gets when more follows.
SEGMENT_LIMIT = SEGMENT_BYTES - len(CONTINUE_TAIL.encode("utf-8"))
#: Segments between the first and the last are at least this long wherever the text allows,
#: and the first at least FIRST_LEAST, so that five hold a 3,000-character Chinese answer
#: (9,000 bytes): 1650 + 3 × 1800 + 2007 ≥ 9000.
SEGMENT_LEAST = 1800
FIRST_LEAST = 1650
#: A sentence ends at 。！？!?；; (or … or ". "), with its closing quotes and brackets.
SENTENCE_END = re.compile(r"[。！？!?；;…]+[”’」』）)\]】\"']*|\.(?=\s)")
LINE_END = re.compile("\n")
PARAGRAPH_END = re.compile(r"\n[ \t]*(?=\n)")
#: After a comma or colon, or before a space.
CLAUSE_END = re.compile(r"[，、,：:]+|(?<=\S)(?=[ \t])")
#: Where a segment may end, best first; a line end cuts before its newline.
BOUNDARIES = [(PARAGRAPH_END, True), (LINE_END, True), (SENTENCE_END, False),
              (CLAUSE_END, False)]
CODE_FENCE = re.compile(r"^[ \t]*(```|~~~)")
#: A line being written is cut at a sentence end each time it grows by this many characters:
#: a paragraph longer than a segment must not hold the segments back until it ends.
LONG_LINE = 100


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _chars_within(text: str, limit: int) -> int:
    """How many characters of text fit in limit bytes of UTF-8."""
    return len(text.encode("utf-8")[:max(0, limit)].decode("utf-8", "ignore"))


def _cut(text: str, limit: int, least: int, blocks: list[tuple[int, int]] = (),
         early: bool = False) -> int | None:
    """Where the next segment of text ends (a character index).

    The last paragraph end that fits, failing that the last line end, then the last sentence
    end, then a comma or space, and only then a character boundary; each at least `least`
    bytes in, wherever the text allows. A code block (start, end) that fits one segment is
    never split: the segment ends before it. A longer one is cut at one of its line ends.
    `early`: the text goes on beyond what is here, so only a real end will do, else None.
    """
    end = _chars_within(text, limit)
    low = _chars_within(text, least - 1) + 1
    long_blocks = []
    for start, stop in blocks:
        if start < end < stop:  # the cut would split this block
            if utf8_len(text[start:stop]) <= limit and text[:start].strip():
                return start
            long_blocks.append((start, stop))

    def allowed(at: int, line_end: bool) -> bool:
        inside = [(start, stop) for start, stop in blocks if start < at < stop]
        return not inside or (line_end and inside[0] in long_blocks)

    near = text[:end + 16]  # a little beyond: a closing quote that does not fit stays
    for pattern, line_end in BOUNDARIES:
        if early and pattern is CLAUSE_END:
            return None
        ends = [match.start() if line_end else match.end() for match in pattern.finditer(near)]
        ends = [at for at in ends if 0 < at <= end and allowed(at, line_end)]
        for at in reversed(ends):
            if at < low:
                break
            if utf8_len(text[:at].rstrip()) >= least:
                return at
        if long_blocks and ends and pattern is LINE_END:
            return ends[-1]  # a line end of the code, though early: never inside a line
    return end


class Markdown:
    """Turns a model's Markdown into plain text, one line at a time, since WeChat shows the
    marks as they are. Code (inline and fenced) is taken out before any rule runs and put
    back as written. Nothing it does makes a line longer."""

    TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
    INLINE_CODE = re.compile(r"(`+)(.+?)\1")
    #: Inline code waits in the Private Use Area while the rules run.
    PLACEHOLDER = re.compile("[\ue000-\uf8ff]")
    LINE_RULES = [
        (re.compile(r"^(\s*)#{1,6}\s+(.*?)[\s#]*$"), r"\1\2"),            # headings
        (re.compile(r"^(\s*)[*+](\s+)"), r"\1-\2"),                        # bullets
        (re.compile(r"^\s*>\s?"), ""),                                      # quotes
    ]
    # Emphasis never inside ASCII words: snake_case_names, 2*3*4 and 2**10 stay as written.
    # Underscores mark emphasis only around Chinese (_强调_): __init__, _a and b_ are code.
    RULES = [
        (re.compile(r"!\[([^\]]*)\]\(([^)\s]+)[^)]*\)"), r"\1 \2"),          # images
        (re.compile(r"\[([^\]]+)\]\(([^)\s]+)[^)]*\)"), r"\1 (\2)"),         # links
        (re.compile(r"(?<![A-Za-z0-9*])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![A-Za-z0-9*])"), r"\1"),
        (re.compile(r"(?<![A-Za-z0-9_])__(?=[^\x00-\x7f])(.+?)(?<=[^\x00-\x7f])__"
                    r"(?![A-Za-z0-9_])"), r"\1"),
        (re.compile(r"(?<![A-Za-z0-9*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![A-Za-z0-9*])"), r"\1"),
        (re.compile(r"(?<![A-Za-z0-9_])_(?=[^\x00-\x7f])(.+?)(?<=[^\x00-\x7f])_"
                    r"(?![A-Za-z0-9_])"), r"\1"),
        (re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"), r"\1"),                     # strike-through
    ]

    def __init__(self):
        self.in_code = False

    def line(self, raw: str, line_start: bool = True) -> str | None:
        """One line as plain text; None for a line that goes (a code fence, a table rule).
        `line_start`: False for the rest of a line whose beginning was taken already."""
        if line_start and CODE_FENCE.match(raw):
            self.in_code = not self.in_code
            return None
        if self.in_code:  # code stays as written, indentation and all
            return raw
        if line_start and "|" in raw and self.TABLE_RULE.match(raw):
            return None
        if self.PLACEHOLDER.search(raw):  # nowhere to park inline code: leave it as it is
            codes, line = [], raw
        else:
            codes = [match.group(2) for match in self.INLINE_CODE.finditer(raw)]
            places = iter(range(len(codes)))
            line = self.INLINE_CODE.sub(lambda match: chr(0xE000 + next(places)), raw)
        if line_start:
            stripped = line.strip()
            if len(stripped) > 1 and stripped[0] == "|" and stripped[-1] == "|":
                line = " | ".join(cell.strip() for cell in stripped[1:-1].split("|"))
            for pattern, replacement in self.LINE_RULES:
                line = pattern.sub(replacement, line)
        for pattern, replacement in self.RULES:
            line = pattern.sub(replacement, line)
        return self.PLACEHOLDER.sub(lambda match: codes[ord(match.group()) - 0xE000], line) \
            if codes else line


class StreamCutter:
    """Cuts an answer into plain-text segments while the model is still writing it.

    Lines are turned into plain text as they complete (a long one at its sentence ends), so
    that segments are measured as the user gets them. The first segment goes out at the first
    paragraph, line or sentence end past FIRST_LEAST bytes; later ones once the limit is
    reached, as full as the text allows (_cut).
    """

    def __init__(self, first_done: bool = False, limit: int = SEGMENT_LIMIT):
        self.first_done, self.limit = first_done, limit
        self.markdown = Markdown()
        self.line = ""           # the raw line being written
        self.line_start = True   # False once the start of self.line has been taken
        self.looked = 0          # how long self.line was when last looked at for a cut
        self.plain = ""          # plain text not cut into segments yet
        self.blocks: list[list[int | None]] = []  # code blocks in self.plain: [start, end]

    def feed(self, text: str) -> list[str]:
        """Take more of the answer; return the segments that are ready."""
        taken = "\n" in text
        if taken:
            *lines, self.line = (self.line + text).split("\n")
            for line in lines:
                self._take(line, whole=True)
            self.looked = 0
        else:
            self.line += text
        if len(self.line) >= self.looked + LONG_LINE and not self.markdown.in_code:
            self.looked = len(self.line)
            at = self._sentence_end(self.line)
            if at:
                self._take(self.line[:at], whole=False)
                self.line = self.line[at:]
                self.looked, taken = 0, True
        return self._segments(final=False) if taken else []  # nothing new to cut

    def finish(self) -> list[str]:
        """The rest, once the model has finished."""
        if self.line:
            self._take(self.line, whole=True)
            self.line = ""
        if self.blocks and self.blocks[-1][1] is None:  # a code block never closed
            self.blocks[-1][1] = len(self.plain.rstrip("\n"))
        return self._segments(final=True)

    @staticmethod
    def _sentence_end(line: str) -> int | None:
        """The last sentence end of a line being written where no inline code, emphasis or
        link is open, so that both parts read the same as the whole."""
        for match in reversed(list(SENTENCE_END.finditer(line))):
            head = line[:match.end()]
            if head.count("`") % 2 == 0 and head.count("**") % 2 == 0 and \
                    head.count("[") == head.count("]") and head.count("(") == head.count(")"):
                return match.end()
        return None

    def _take(self, raw: str, whole: bool) -> None:
        was_code = self.markdown.in_code
        plain = self.markdown.line(raw, self.line_start)
        self.line_start = whole
        if plain is None:
            if self.markdown.in_code and not was_code:
                self.blocks.append([len(self.plain), None])
            elif was_code and not self.markdown.in_code:
                self.blocks[-1][1] = max(self.blocks[-1][0], len(self.plain) - 1)
            return
        if whole and not plain.strip() and not self.markdown.in_code and \
                (not self.plain or self.plain.endswith("\n\n")):
            return  # one blank line between paragraphs is enough
        self.plain += plain + ("\n" if whole else "")

    def _segments(self, final: bool) -> list[str]:
        ready = []
        while self.plain.strip():
            size = utf8_len(self.plain)
            blocks = [(start, len(self.plain) if end is None else end)
                      for start, end in self.blocks]
            if size <= self.limit and (final or self.first_done):
                if not final:
                    break
                at = len(self.plain)
            elif not self.first_done and size < FIRST_LEAST and not final:
                break
            else:
                least = SEGMENT_LEAST if self.first_done else FIRST_LEAST
                at = _cut(self.plain, self.limit, least, blocks, early=size <= self.limit)
                if at is None:
                    break
            ready.append(self.plain[:at].rstrip())
            self.first_done = True
            code_next = [start for start, _ in blocks
                         if start >= at and not self.plain[at:start].strip()]
            if code_next:  # the next segment starts with code: its indentation stays
                rest = self.plain[code_next[0]:]
            elif any(start < at < end for start, end in blocks):  # cut at a line of code
                rest = self.plain[at:].lstrip("\n")
            else:
                rest = self.plain[at:].lstrip()
            gone = len(self.plain) - len(rest)
            self.plain = rest
            self.blocks = [[max(0, start - gone), None if end is None else end - gone]
                           for start, end in self.blocks if end is None or end > gone]
        return [segment for segment in ready if segment]


def split_segments(text: str, limit: int = SEGMENT_LIMIT) -> list[str]:
    """A whole answer as plain-text segments of at most limit UTF-8 bytes (see _cut)."""
    cutter = StreamCutter(first_done=True, limit=limit)
    return cutter.feed(text) + cutter.finish()


###############################################################################
# Worker ######################################################################
###############################################################################

def stats_text(stats: dict) -> str:
    """/stats for an admin, in the owner's words."""
    token = stats["token_valid_s"]
    return "\n".join([
        f"排队中：{stats['queued']}（处理中 {stats['in_progress']}，最久 "
        f"{stats['oldest_queued_age_s']:.0f} 秒）",
        f"今日消息：{stats['today']}，失败：{stats['failed_today']}，放弃：{stats['dead_today']}",
        f"平均回答用时：{stats['answer_seconds_avg']} 秒",
        f"access token：{'剩余 %d 秒' % token if token and token > 0 else '未获取或已过期'}",
        f"未发送的分段：{stats['unsent_segments']}"])


class Wakeup:
    """Wakes idle workers the moment the webhook stores a message: no polling delay."""

    def __init__(self):
        self._condition = threading.Condition()
        self._pending = 0

    def notify(self) -> None:
        with self._condition:
            self._pending += 1
            self._condition.notify()

    def notify_all(self) -> None:
        with self._condition:
            self._pending += 1000
            self._condition.notify_all()

    def wait(self, timeout: float | None) -> None:
        with self._condition:
            if not self._pending:
                self._condition.wait(timeout)
            self._pending = max(0, self._pending - 1)


class Worker:
    """Takes queued messages one at a time and answers them; one per thread."""

    #: The model gets this many tries before the user gets the apology.
    MODEL_TRIES = 3
    #: Delivery gives up (state dead) after this many claims of one message.
    MAX_ATTEMPTS = 10
    #: Typing shows for 15 s; renew once while the model is still working (45081 before).
    TYPING_RENEW = 15.5

    def __init__(self, settings: Settings, store: Store, wechat: WeChatAPI, model: Model,
                 wakeup: Wakeup, mode: DeliveryMode, name: str = "worker"):
        self.settings, self.store, self.wechat, self.model = settings, store, wechat, model
        self.wakeup, self.mode, self.name = wakeup, mode, name
        self.stopping = threading.Event()
        self.lease_seconds = settings.model_timeout * 2 + 120

    # Loop -------------------------------------------------------------------

    def loop(self, now: float | None = None) -> bool:
        """Claim and handle one message; False when nothing was due."""
        message = self.store.claim(time.time() if now is None else now, self.lease_seconds)
        if message is None:
            return False
        try:
            self.handle(message)
            self.wakeup.notify()  # the user's next message, if any, may now be claimed
        except LeaseLost:
            log_worker.warning("message %s: lease lost, another worker has it", message.id)
        except Exception:  # one bad message never kills the thread
            log_worker.exception("message %s: unexpected error; will retry", message.id)
            with contextlib.suppress(LeaseLost, sqlite3.Error):
                self.store.release(message, time.time() + self._backoff(message.attempts),
                                   "internal error")
        return True

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.loop():
                    continue
                due = self.store.next_due(time.time())
            except sqlite3.Error as error:
                log_worker.error("database error: %s; retrying in 1 s", error)
                due = time.time() + 1
            timeout = None if due is None else max(0.01, min(due - time.time(), 3600))
            self.wakeup.wait(timeout)

    def stop(self) -> None:
        self.stopping.set()

    def _backoff(self, attempts: int) -> float:
        delay = self.settings.retry_base * 2 ** max(0, attempts - 1)
        return min(delay, 600) * random.uniform(0.5, 1.5)

    # One message ------------------------------------------------------------

    def handle(self, message: Message) -> None:
        started = time.monotonic()
        model_seconds = None
        if not self.store.answer_complete(message.id):
            planned = self.plan(message)
            if planned is None:  # the model failed and the message went back to the queue
                return
            if not planned:
                self.store.finish(message, State.DONE)
                log_worker.info("message %s from %s: %s, nothing to send", message.id,
                                short_id(message.openid), message.event or message.msg_type)
                return
            model_seconds = time.monotonic() - started
        self.deliver(message, model_seconds)

    def plan(self, message: Message) -> int | None:
        """Decide and store what to send; the number of segments, or None to retry later."""
        now = time.time()
        intent = classify(message.msg_type, message.content)
        text = intent.text
        if intent.kind is Kind.EVENT:  # LOCATION (every 5 s), VIEW and the rest: nothing
            line = self.settings.welcome if message.event == "subscribe" else ""
            return self.store.save_answer(message, split_segments(line), now, carry=False)
        if intent.kind is Kind.RESET:
            self.store.forget(message.openid)
            return self.store.save_answer(message, [RESET_LINE], now, leftovers=Leftovers.DROP)
        if intent.kind is Kind.HELP:
            return self.store.save_answer(message, [HELP_LINE], now)
        if intent.kind is Kind.STATS and message.openid in self.settings.admins:
            return self.store.save_answer(message, [stats_text(self.store.stats(now))], now)
        if intent.kind is Kind.CONTINUE:  # fetches the rest; never a question for the model
            return self.store.save_answer(message, [], now, leftovers=Leftovers.TAKE,
                                          if_nothing=[NOTHING_MORE_LINE])
        if message.msg_type == "voice" and not text:
            log_worker.warning("message %s: a voice message without Recognition; turn on "
                               "公众号后台 → 设置与开发 → 接口权限 → 接收语音识别结果", message.id)
            return self.store.save_answer(message, [VOICE_UNRECOGNISED_LINE], now)
        picture = message.fields.get("PicUrl", "") if message.msg_type == "image" else ""
        if self.settings.vision and picture.startswith(("http://", "https://")):
            return self.answer_text(message, "", picture)
        if message.msg_type not in ("text", "voice") or not text:
            return self.store.save_answer(message, [TEXT_ONLY_LINE], now)
        return self.answer_text(message, text)

    def answer_text(self, message: Message, question: str, picture: str = "") -> int | None:
        """Ask the model, streaming: segments are stored and sent while it writes.

        A picture (WXBOT_VISION) goes as an image part, with the texts that follow it or, on
        its own, a short instruction.
        """
        question = "\n".join(part for part in [question, *self.store.merge_followups(
            message, time.time())] if part) or IMAGE_PROMPT
        if len(question) > MAX_QUESTION_CHARS:
            question = question[:MAX_QUESTION_CHARS] + TRUNCATED_NOTE.format(
                chars=MAX_QUESTION_CHARS)
        wait = self.store.count_model_call(message, time.time(), [
            (60, self.settings.user_rate), (86400, self.settings.user_daily)])
        if wait is not None:
            return self._over_limit(message, wait)
        self.store.start_answer(message, leftovers=Leftovers.DROP)
        history = self.store.history(message.openid, self.settings.history_turns,
                                     self.settings.context_chars,
                                     time.time() - self.settings.session_ttl)
        ask = [{"role": "user", "content": question if not picture else [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": picture}}]}]
        partial = self.store.partial_answer(message.id)
        if partial:  # a stream cut off before: ask for the rest, never for all of it again
            ask += [{"role": "assistant", "content": partial},
                    {"role": "user", "content": RESUME_PROMPT}]
        if not self.mode.passive:
            self.wechat.typing_soon(message.openid)
        renew = threading.Timer(self.TYPING_RENEW, self._renew_typing, (message,))
        renew.daemon = True
        renew.start()
        cutter = StreamCutter(first_done=bool(partial))
        written, sending = [], True
        try:
            for text in self._ask(history, ask):
                written.append(text)
                ready = cutter.feed(text)
                if ready:
                    self.store.add_segments(message, ready)
                    # After a failed send, the rest waits for the end of the answer.
                    sending = sending and self.deliver(message, streaming=True)
            rest = cutter.finish()
        except ModelError as error:
            self.store.add_segments(message, cutter.finish())
            return self._model_failed(message, error, question)
        finally:
            renew.cancel()
        answer = "\n\n".join(part for part in (partial, "".join(written).strip()) if part)
        return self.store.complete_answer(message, time.time(), rest,
                                          f"[图片] {question}" if picture else question, answer)

    def _ask(self, history: list[dict], ask: list[dict]) -> Iterator[str]:
        """The model's answer as it streams; a context-too-long error retries without history."""
        system = [{"role": "system", "content": self.settings.system_prompt}]
        try:
            yield from self.model.stream(system + history + ask)
            return
        except ModelError as error:
            if error.kind != "context" or not history:
                raise
        log_worker.warning("context too long for the model; retrying without history")
        yield from self.model.stream(system + ask)

    def _renew_typing(self, message: Message) -> None:
        # Typing needs an exchange with the user in the last 30 s (45080).
        if time.time() - message.received_at < 30 and not self.mode.passive:
            self.wechat.typing(message.openid)

    def _over_limit(self, message: Message, wait: float) -> int:
        """One short notice per user and window; further messages in it get nothing."""
        now = time.time()
        line = (RATE_LINE.format(wait=max(1, round(wait))) if wait <= 60
                else DAILY_LINE.format(hours=max(1, round(wait / 3600))))
        notice_key = f"limit-notice:{message.openid}"
        segments = [] if self.store.get_kv(notice_key, now) else [line]
        if segments:
            self.store.set_kv(notice_key, "1", now + wait)
        log_worker.warning("message %s from %s: over the per-user limit (WXBOT_USER_RATE/"
                           "WXBOT_USER_DAILY); no model call, %s", message.id,
                           short_id(message.openid), "notice sent" if segments else "silent")
        return self.store.save_answer(message, segments, now)

    def _model_failed(self, message: Message, error: ModelError, question: str) -> int | None:
        """Retry later, or end the answer with a polite line; what was sent stays sent."""
        partial = self.store.partial_answer(message.id)
        if error.kind == "transient" and message.attempts < self.MODEL_TRIES:
            delay = max(error.retry_after or 0, self._backoff(message.attempts))
            log_worker.warning("message %s: model failed (%s); retry %d/%d in %.1f s",
                               message.id, error, message.attempts, self.MODEL_TRIES - 1, delay)
            self.store.release(message, time.time() + delay, str(error))
            self.wakeup.notify()
            return None
        if error.kind == "refused":
            log_worker.warning("message %s: the model refused (content filter)", message.id)
            line = REFUSED_LINE
        else:
            log_worker.error("message %s from %s: model failed (%s); sending the apology",
                             message.id, short_id(message.openid), error)
            line = CUT_OFF_LINE if partial else APOLOGY_LINE
        return self.store.complete_answer(message, time.time(), [line], question,
                                          partial or None)

    def deliver(self, message: Message, model_seconds: float | None = None,
                streaming: bool = False) -> bool:
        """Send the unsent segments in order, each marked sent as WeChat confirms it.

        WeChat allows 5 messages per user message (45047): the 5th says how to get the rest,
        so while the model still writes, the 5th waits until it is known whether more follows.
        False when a send failed.
        """
        rows = self.store.segments(message.id)
        sent = sum(1 for row in rows if row["sent_at"] is not None)
        for row in rows:
            if self.mode.passive:  # the webhook hands them out, one per push of the user
                break
            if row["sent_at"] is not None:
                continue
            if sent >= QUOTA or (streaming and sent == QUOTA - 1):
                break
            text = row["content"]
            if sent == QUOTA - 1 and len(rows) > QUOTA:
                text += CONTINUE_TAIL
            if row["tried_at"] is not None:
                # WeChat has no idempotency key: a send cut off by a crash or a timeout may
                # have arrived. Sending again risks a repeat; not sending risks a loss.
                log_worker.warning("message %s: segment %d was in flight when its last try "
                                   "ended; sending it again (the user may see it twice)",
                                   message.id, row["seq"])
            now = time.time()
            self.store.mark_trying(message, row["seq"], now, now + self.lease_seconds)
            try:
                self.wechat.customer_service_send(message.openid, text)
            except WeChatError as error:
                if not streaming:  # while streaming, the final delivery deals with it
                    self._send_failed(message, error)
                return False
            self.store.mark_sent(message, row["seq"], time.time())
            sent += 1
        if streaming:
            return True
        apology = [row["content"] for row in rows] == [APOLOGY_LINE]
        self.store.finish(message, State.FAILED if apology else State.DONE)
        log_worker.info("message %s from %s (%s): model %s, segments sent %d/%d", message.id,
                        short_id(message.openid), message.msg_id or message.event,
                        f"{model_seconds:.2f}s" if model_seconds is not None else "-",
                        sent, len(rows))
        return True

    def _send_failed(self, message: Message, error: WeChatError) -> None:
        if error.errcode == 48001 and self.mode.no_permission():
            self.store.finish(message, State.DONE)  # what is unsent goes out passively
            return
        if error.errcode in GIVE_UP:
            if self.wechat.first_time(error.errcode):
                log_worker.error("message %s to %s not delivered: %s", message.id,
                                 short_id(message.openid), error.hint())
            self.store.finish(message, State.DONE, f"errcode {error.errcode}")
            return
        if message.attempts >= self.MAX_ATTEMPTS:
            log_worker.error("message %s: giving up after %d attempts (state dead, kept in the"
                             " database): %s", message.id, message.attempts, error.hint())
            self.store.finish(message, State.DEAD, str(error))
            return
        delay = self._backoff(message.attempts)
        if error.errcode in (40164, 45011):  # whitelist or per-minute limit: not a hot loop
            delay = max(delay, 30 * self.settings.retry_base)
        log_worker.warning("message %s: send failed (%s); retry in %.1f s", message.id,
                           error.hint(), delay)
        self.store.release(message, time.time() + delay, str(error))


###############################################################################
# Web app: the webhook ########################################################
###############################################################################

#: WeChat's pushes are a few KB; anything bigger is refused unread.
MAX_BODY = 1024 * 1024


def query_dict(environ: dict) -> dict[str, str]:
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    return {key: values[0] for key, values in query.items()}


#: Passive replies: WeChat waits 5 s for a reply, then pushes the same message again, three
#: times in all. A reply not ready in time lets the try lapse so that the next one comes;
#: the third try gets THINKING_LINE rather than nothing.
WECHAT_TIMEOUT = 5.0
PASSIVE_WAIT = 4.5
PASSIVE_LAST_WAIT = 4.0


def text_reply_xml(openid: str, account: str, content: str, now: float) -> bytes:
    """WeChat's passive text reply; Content is never empty."""
    content = (content or APOLOGY_LINE).replace("]]>", "]]]]><![CDATA[>")
    return (f"<xml><ToUserName><![CDATA[{openid}]]></ToUserName>"
            f"<FromUserName><![CDATA[{account}]]></FromUserName>"
            f"<CreateTime>{int(now)}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content></xml>").encode("utf-8")


class Webhook:
    """Turns WeChat's HTTP calls into stored pushes; pure of I/O apart from the store."""

    def __init__(self, settings: Settings, store: Store, wakeup: Wakeup,
                 mode: DeliveryMode | None = None, clock: Callable[[], float] = time.time):
        self.settings, self.store, self.wakeup, self.clock = settings, store, wakeup, clock
        self.mode = mode or DeliveryMode("service", store)
        self.crypto = (WeChatCrypto(settings.aes_key, settings.appid)
                       if settings.aes_key else None)
        self.accepting = True

    def verify(self, query: Mapping[str, str]) -> tuple[int, str]:
        """GET: the server check WeChat makes when the URL is saved in 公众号后台."""
        try:
            check_signature(self.settings.token, query, self.clock(), self.settings.max_skew)
        except Forbidden as error:
            log_web.warning("verification refused: %s", error)
            return 403, "forbidden"
        return 200, query.get("echostr", "")

    def receive(self, query: Mapping[str, str], body: bytes) -> tuple[int, str]:
        """POST: check, decrypt, parse, store; (status, body) for WeChat."""
        if not self.accepting:
            return 503, "stopping"
        try:
            push = self.parse(query, body)
        except Forbidden as error:
            log_web.warning("push refused (403): %s", error)
            return 403, "forbidden"
        except BadPush as error:
            log_web.warning("push refused (400): %s", error)
            return 400, "bad request"
        message_id, pushes = self.store.store_push(push, self.clock())
        if pushes == 1:
            self.wakeup.notify()
        else:
            log_web.debug("retried push %s from %s already stored", push.dedup_key,
                          short_id(push.openid))
        if self.mode.passive:
            return 200, self.passive_reply(push, message_id, pushes, query)
        return 200, "success"

    def passive_reply(self, push: Push, message_id: int, pushes: int,
                      query: Mapping[str, str]) -> str:
        """The reply to this push: the user's next segment, once it is ready."""
        started = time.monotonic()
        last_try = pushes >= 3
        deadline = started + (PASSIVE_LAST_WAIT if last_try else PASSIVE_WAIT)
        while True:
            settled = self.store.settled(message_id)  # before the look, so nothing is missed
            reply = self.store.passive_reply(push.openid, message_id, time.time())
            if reply:
                text, more = reply
                return self.reply_body(push, text + CONTINUE_TAIL if more else text, query)
            if settled:
                return "success"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with self.store.changed:
                self.store.changed.wait(min(remaining, 0.5))
        if last_try:
            return self.reply_body(push, THINKING_LINE, query)
        # Let this try lapse unanswered: WeChat then pushes the message again.
        time.sleep(max(0.0, started + WECHAT_TIMEOUT + 0.5 - time.monotonic()))
        return "success"

    def reply_body(self, push: Push, text: str, query: Mapping[str, str]) -> str:
        xml = text_reply_xml(push.openid, push.account, text, self.clock())
        if query.get("encrypt_type") == "aes" and self.crypto:
            xml = self.crypto.reply(self.settings.token, xml, query.get("timestamp", ""),
                                    query.get("nonce", ""))
        return xml.decode("utf-8")

    def parse(self, query: Mapping[str, str], body: bytes) -> Push:
        check_signature(self.settings.token, query, self.clock(), self.settings.max_skew)
        fields = parse_xml(body)
        if query.get("encrypt_type", "raw") == "aes":
            fields = self.decrypt(query, fields)
        elif query.get("encrypt_type", "raw") != "raw":
            raise BadPush(f"unknown encrypt_type {query.get('encrypt_type')[:10]!r}")
        return Push.from_fields(fields)

    def decrypt(self, query: Mapping[str, str], fields: dict[str, str]) -> dict[str, str]:
        if self.crypto is None:
            raise Forbidden("an encrypted push arrived but WXBOT_AES_KEY is not set: set it to "
                            "the EncodingAESKey from 公众号后台 → 设置与开发 → 基本配置")
        encrypted = fields.get("Encrypt", "")
        if not encrypted:
            raise BadPush("encrypt_type=aes but no <Encrypt>")
        expected = wechat_signature(self.settings.token, query.get("timestamp", ""),
                                    query.get("nonce", ""), encrypted)
        if not hmac.compare_digest(expected.encode(),
                                   query.get("msg_signature", "").encode("utf-8", "replace")):
            raise Forbidden("msg_signature does not match")
        return parse_xml(self.crypto.decrypt(encrypted))


def make_app(settings: Settings, store: Store, webhook: Webhook) -> bottle.Bottle:
    """The WSGI app: the webhook at WXBOT_PATH and /healthz."""
    app = bottle.Bottle(catchall=True)

    def text(status: int, body: str) -> bottle.HTTPResponse:
        kind = "application/xml" if body.startswith("<xml>") else "text/plain"
        return bottle.HTTPResponse(body, status, {"Content-Type": f"{kind}; charset=utf-8"})

    @app.get(settings.path)
    def verify():
        """WeChat's server check: the echostr back when the signature is valid."""
        return text(*webhook.verify(query_dict(bottle.request.environ)))

    @app.post(settings.path)
    def receive():
        """A push: stored and answered "success" at once."""
        length = bottle.request.content_length
        if length > MAX_BODY:
            return text(413, "too large")
        if length < 0:
            return text(411, "length required")
        body = bottle.request.environ["wsgi.input"].read(length)
        try:
            return text(*webhook.receive(query_dict(bottle.request.environ), body))
        except sqlite3.Error as error:  # not answered: WeChat retries the push
            log_web.error("could not store a push: %s", error)
            return text(503, "busy")

    @app.get("/healthz")
    def healthz():
        """Queue depth and the age of the oldest waiting message."""
        health = {"status": "ok", **store.health(time.time())}
        return bottle.HTTPResponse(json.dumps(health), 200,
                                   {"Content-Type": "application/json"})

    @app.error(404)
    @app.error(405)
    def not_here(error):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return "not found" if error.status_code == 404 else "method not allowed"

    @app.error(500)
    def internal(error):
        log_web.error("internal error: %s", error.exception)
        bottle.response.content_type = "text/plain; charset=utf-8"
        return "error"

    return app


###############################################################################
# HTTP server #################################################################
###############################################################################

class QuietHandler(WSGIRequestHandler):
    """Drops a stalled client after `timeout` seconds; access lines go to DEBUG."""

    timeout = 10

    def log_message(self, format, *args):
        log_web.debug("%s %s", self.address_string(), format % args)

    def handle(self):
        with contextlib.suppress(socket.timeout, ConnectionError):
            super().handle()


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection, so a slow client never holds up WeChat's next push."""

    daemon_threads = True
    allow_reuse_address = True
    # Python's default backlog is 5: under a burst the kernel drops connection attempts and
    # clients retry a second later, past WeChat's 5 s budget (BENCHMARKS.md).
    request_queue_size = 1024


class HttpServer:
    """make_server + serve_forever in a thread, with a clean stop (bottle.run has none)."""

    def __init__(self, app, host: str, port: int):
        self.server = make_server(host, port, app, ThreadingServer, QuietHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="http",
                                       kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


###############################################################################
# Lifecycle and main ##########################################################
###############################################################################

class Bot:
    """Everything wired together: store, webhook, server, workers."""

    def __init__(self, settings: Settings):
        self.settings = settings
        for secret in settings.secrets():
            SECRET_FILTER.add(secret)
        self.store = Store(settings.db)
        self.wakeup = Wakeup()
        self.wechat = WeChatAPI(settings, self.store)
        self.model = Model(settings)
        self.mode = DeliveryMode(settings.mode, self.store)
        self.webhook = Webhook(settings, self.store, self.wakeup, self.mode)
        self.server = HttpServer(make_app(settings, self.store, self.webhook),
                                 settings.host, settings.port)
        self.workers = [Worker(settings, self.store, self.wechat, self.model, self.wakeup,
                               self.mode, f"worker-{n}") for n in range(settings.workers)]
        self.threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        recovered = self.store.release_all_leases()
        if recovered:
            log.info("resuming %d message(s) that were in progress at the last stop", recovered)
        self.server.start()
        for worker in self.workers:
            thread = threading.Thread(target=worker.run, name=worker.name, daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("listening on http://%s:%d%s with %d workers, answers by %s", self.settings.host,
                 self.port, self.settings.path, len(self.workers),
                 "passive reply" if self.mode.passive else "customer-service API")

    def stop(self, timeout: float | None = None) -> bool:
        """Stop taking pushes, let answers in flight finish; True when all finished in time."""
        timeout = self.settings.stop_timeout if timeout is None else timeout
        self.webhook.accepting = False
        self.server.stop()
        for worker in self.workers:
            worker.stop()
        self.wakeup.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        finished = not any(thread.is_alive() for thread in self.threads)
        if not finished:
            log.warning("stop timeout reached; unfinished answers resume at the next start")
        self.store.release_all_leases()
        self.store.close()
        return finished


class Console:
    """Stands in for WeChat in `chat`: prints each segment as WeChat would show it."""

    def __init__(self, out):
        self.out = out

    def customer_service_send(self, openid: str, text: str) -> None:
        print(f"\n{text}\n{'─' * 20}", file=self.out, flush=True)

    def typing(self, openid: str, command: str = "Typing") -> None:
        pass

    def typing_soon(self, openid: str) -> None:
        pass

    def first_time(self, errcode: int) -> bool:
        return True


def chat(settings: Settings, lines, out) -> int:
    """A console conversation with the real model, through wxbot's own worker."""
    root, ext = os.path.splitext(settings.db)
    settings = dataclasses.replace(settings, db=f"{root}-chat{ext or '.db'}", user_rate=0,
                                   user_daily=0)
    store = Store(settings.db)
    worker = Worker(settings, store, Console(out), Model(settings), Wakeup(),
                    DeliveryMode("service", store), "chat")
    print(f"wxbot chat with {settings.model} (history in {settings.db}; /reset forgets it, "
          f"Ctrl-D ends)", file=out, flush=True)
    for line in lines:
        if not line.strip():
            continue
        now = time.time()
        message_id, _ = store.store_push(Push("local-console", "local", "text", str(int(now)),
                                              str(time.time_ns()), None, line.strip(), {}), now)
        while not store.settled(message_id):  # through the model's retries, as in serve
            if not worker.loop():
                due = store.next_due(time.time()) or time.time() + 0.1
                time.sleep(min(1.0, max(0.01, due - time.time())))
    store.close()
    return 0


def check(settings: Settings, out) -> int:
    """Try every setting for real: the database, an access token, one tiny model request."""
    failures = 0

    def report(ok: bool, text: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {text}", file=out, flush=True)

    try:
        store = Store(settings.db)
        report(True, f"database {settings.db} opens")
    except (sqlite3.Error, OSError, RuntimeError) as error:
        report(False, f"database {settings.db}: {error} (check WXBOT_DB and the folder's rights)")
        store = Store(":memory:")
    try:
        WeChatAPI(settings, store)._fetch_token(force=False)
        report(True, f"WeChat gave an access token for AppID {settings.appid}")
    except WeChatError as error:
        if error.errcode is None:
            report(False, f"cannot reach WeChat at {settings.api_base}: {error.errmsg}")
        elif error.errcode == 40164:
            report(False, f"WeChat saw this server as {error.ip() or 'an IP'} and it "
                          f"is not whitelisted: add it in 公众号后台 → 设置与开发 → 基本配置 → "
                          f"IP白名单, then run check again")
        elif error.errcode in (40013, 40125, 40243, 41004):
            report(False, HINTS.get(error.errcode, "WXBOT_APPSECRET is missing or wrong"))
        else:
            report(False, f"WeChat refused the access token: {error.hint()}")
    try:
        Model(settings).answer([{"role": "user", "content": "ping"}], max_tokens=5)
        report(True, f"the model {settings.model} answers")
    except ModelError as error:
        mentions_model = "model" in error.detail.lower()
        if error.status in (401, 403):
            report(False, "the model provider refused OPENAI_API_KEY: copy the key again")
        elif error.status in (400, 404) and mentions_model:
            report(False, f"the provider does not know the model {settings.model!r}: check "
                          f"WXBOT_MODEL against the provider's model list")
        elif error.status is None or error.status == 404:
            report(False, f"no OpenAI-compatible API at "
                          f"{settings.openai_base_url or 'https://api.openai.com/v1'}: check "
                          f"OPENAI_BASE_URL (it usually ends in /v1)")
        else:
            report(False, f"the model failed: {error}")
    store.close()
    print(f"\nIn 公众号后台 → 设置与开发 → 基本配置 → 服务器配置, enter:\n"
          f"  URL:   http://<this server's domain or IP>{settings.path}  (port 80, or 443 "
          f"with https; wxbot listens on {settings.host}:{settings.port})\n"
          f"  Token: {settings.token}\n"
          f"  消息加解密方式: {'兼容模式 or 安全模式' if settings.aes_key else '明文模式'}",
          file=out)
    print("all checks passed" if not failures else f"{failures} check(s) failed", file=out)
    return 0 if not failures else 1


def help_text() -> str:
    lines = ["settings (environment variables, or KEY=VALUE lines in --env FILE):"]
    for setting in SETTINGS.values():
        default = "required" if setting.default is None else f"default {setting.default!r}"
        if setting.default and len(setting.default) > 40:
            default = "default: see README"
        lines.append(f"  {setting.env:<22} {setting.help} ({default})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wxbot.py", description=__doc__.split("\n")[0], epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "check", "chat"],
                        help="serve (default): run the bot; check: try the settings for real; "
                             "chat: talk to the model in this console")
    parser.add_argument("--env", metavar="FILE", help="read KEY=VALUE settings from FILE")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(SECRET_FILTER)
    for noisy in ("httpx", "httpcore", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    env = dict(os.environ if environ is None else environ)
    try:
        if args.env:
            env.update(read_env_file(args.env))
        if args.command == "chat":  # no WeChat involved
            env = {"WXBOT_TOKEN": "-", "WXBOT_APPID": "-", "WXBOT_APPSECRET": "-", **env}
        settings = Settings.from_env(env)
    except SettingsError as error:
        for problem in error.problems:
            print(f"wxbot: {problem}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"wxbot: cannot read --env file: {error}", file=sys.stderr)
        return 2

    if args.command == "check":
        return check(settings, sys.stdout)
    if args.command == "chat":
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        return chat(settings, sys.stdin, sys.stdout)
    log.info("wxbot %s starting: %s", __version__, settings.describe())
    try:
        bot = Bot(settings)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, error)
        return 1
    except (sqlite3.Error, RuntimeError) as error:
        log.error("cannot open the database %s: %s", settings.db, error)
        return 1

    stop_requested = threading.Event()

    def on_signal(signum, frame):
        if stop_requested.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bot.start()
    while not stop_requested.wait(3600):
        pass
    log.info("stopping: no new pushes; finishing answers in flight (up to %.0f s)",
             settings.stop_timeout)
    bot.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
