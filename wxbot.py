#!/usr/bin/env python3
"""wxbot: any OpenAI-compatible model behind a WeChat Official Account (公众号).

How a message travels:
  WeChat --POST--> webhook: signature, decryption, XML --> SQLite queue --> answers "success"
  acknowledger --> "Typing" at once (or a line with the wait, when the queue is long)
  worker thread --> claims the message with a lease --> model (with the user's turns)
  --> answer and its segments stored --> customer-service API (custom/send), each segment
  marked sent as WeChat confirms it. A crash or restart resumes at the first unsent segment.

Usage:
  python wxbot.py [--env FILE]     serve (settings from the environment and FILE)
  python wxbot.py --help           every setting with its default
  python wxbot.py menu FILE.json   make FILE the account's custom menu (--show, --delete)
  python wxbot.py status           the queue: waiting, in progress, dead (safe while serving)
  python wxbot.py retry ID         queue a dead message again
  python wxbot.py backup FILE      a checked copy of the database (safe while serving)
  python wxbot.py learn SOURCE...  learn the account's articles: URLs, files, folders,
                                   --published (then kept in sync); --list; --forget SOURCE
With WXBOT_ADMIN_PASSWORD set, serve also runs the owner's console, a web page of what
readers ask, the queue and the articles, on WXBOT_ADMIN_HOST:WXBOT_ADMIN_PORT (127.0.0.1:8081).
Stop with SIGTERM or Ctrl-C: pushes stop being taken, answers in flight finish within
WXBOT_STOP_TIMEOUT seconds, and what was not finished is answered after the next start.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import array
import base64
import codecs
import collections
import contextlib
import copy
import dataclasses
import datetime
import enum
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import html.parser
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import pwd
import queue
import random
import re
import secrets
import select
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
import statistics
import struct
import sys
import termios
import threading
import time
import unicodedata
import urllib.parse
import xml.parsers.expat
from typing import Callable, Container, Generator, Iterable, Iterator, Mapping, Sequence

#: How `python wxbot.py` runs this file as the module wxbot (below): its folder first on
#: sys.path (in place of the working directory `-c` puts there) before anything else is
#: imported, its path taken from the arguments.
HAND_OVER = ("import sys; path = sys.argv.pop(1); folder = path.rpartition('/')[0] or '/'; "
             "sys.path[:1 if sys.path[:1] == [''] else 0] = [folder]; "
             "import importlib.machinery, importlib.util; "
             "loader = importlib.machinery.SourceFileLoader('wxbot', path); "
             "spec = importlib.util.spec_from_loader('wxbot', loader); "
             "module = sys.modules['wxbot'] = importlib.util.module_from_spec(spec); "
             "loader.exec_module(module); sys.exit(module.main())")

if __name__ == "__main__" and __spec__ is None and sys.executable and os.path.isfile(__file__):
    # A script's syntax tree is kept for as long as the script runs: some 20 MB of this
    # file's, for the server's whole life. An imported module's is freed once compiled
    # (and the code is read from __pycache__ where it can be written). So `python
    # wxbot.py` hands over at once to this file imported as a module: the same process
    # (exec), interpreter options and arguments, the file's folder first on sys.path as a
    # script's is (never the working directory's modules); `python -m wxbot` needs none.
    # Where the interpreter cannot be run again by its path (a folder this user may not
    # enter), the script goes on as it is.
    with contextlib.suppress(OSError):
        os.execv(sys.executable, [
            sys.executable, *[option for option in
                              sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
                              if option != "--"],
            "-c", HAND_OVER, os.path.realpath(__file__), *sys.argv[1:]])

import bottle
import openai
import requests
import urllib3

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
#: A message starting with one of these asks for a picture (WXBOT_IMAGE_MODEL); longest first.
DRAW_WORDS = ("画一张", "画", "/draw")
#: A message that starts with 画 but reads as a question (画蛇添足是什么意思, 画家梵高是谁？)
#: is a question: a picture in its place would be a wrong answer and cost an image.
DRAW_QUESTION = re.compile(r"[？?吗呢]\s*$|什么|怎么|为什么|是谁|哪[里个些儿]|如何")
DRAW_HOW_LINE = "想画什么？请在“画”后面写上画面，例如：画一只在窗台上晒太阳的橘猫"
#: The line /help adds, after its first, when drawing is on.
HELP_DRAW_LINE = "发送“画”加上画面（如“画一只橘猫”）：为你画一张图"
#: The line /help adds, after its first, when the model sees pictures (WXBOT_VISION).
HELP_VISION_LINE = "也可以直接发图片给我，我来看图回答"
DRAW_REFUSED_LINE = "抱歉，这个画面我不能画，换个描述试试吧。"
DRAW_DAILY_LINE = "今天的画图次数已用完（每天 {limit} 张），请约 {hours} 小时后再来。"
#: The account may not upload media (48001: unverified): a line instead of the picture.
IMAGE_NOT_ALLOWED_LINE = "抱歉，这个公众号暂时不能发送图片。"
IMAGE_UNUSABLE_LINE = "抱歉，这张图片的格式或大小微信发不了，请稍后再试。"
IMAGE_GONE_LINE = "这张图片已经过期了，请重新画一次。"
#: What an image stands as among the segments of an answer, where a text is needed.
IMAGE_SEGMENT = "[图片]"
#: Tapping it sends 继续 as the user's own message, with <bizmsgmenuid> naming the answer
#: whose rest it fetches (WECHAT.md §8); typing 继续 does the same for the latest answer.
CONTINUE_LINK = ('<a href="weixin://bizmsgmenu?msgmenucontent=继续&msgmenuid={answer}">'
                 '继续</a>')
CONTINUE_TAIL = "\n\n（还有{remaining}段，点{link}查看）"
#: The tail when how much follows is not known yet (an answer still being written).
MORE_TAIL = "\n\n（点{link}查看剩余内容）"
#: The tail when this answer is whole and what follows is the answer to a later question.
NEXT_TAIL = "\n\n（这个回答完了，点{link}查看你下一个问题的回答）"
#: The tail when the tappable one does not fit the segment's 2048 bytes: room for it is kept.
TYPED_TAIL = "\n\n（回复“继续”查看剩余内容）"
STALE_CONTINUE_LINE = "那条回答的剩余内容已经不再保留了，请直接提问吧。"
NOTHING_MORE_LINE = "没有更多内容了，请直接提问吧。"
THINKING_LINE = "正在思考，请稍后点{link}获取回答。"
#: Sent at once when a message will wait longer than WXBOT_QUEUE_NOTICE seconds for a worker.
QUEUE_LINE = "收到！前面还有 {ahead} 人在排队，预计 {minutes} 分钟内回复。"
#: The same when the queue is longer than was counted (Store.AHEAD_READ).
QUEUE_LINE_LONG = "收到！现在排队的人很多，回复可能要 {minutes} 分钟以上，请耐心等待。"
#: The notices of a user's limits say that what they send meanwhile is not kept: it is
#: never answered, not even once the limit frees.
RATE_LINE = "你发得有点快，这条和 {wait} 秒内再发的消息都不会回答，请 {wait} 秒后再问我。"
DAILY_LINE = "今天的提问次数已用完，这条和约 {hours} 小时内再发的消息都不会回答，请到时再来。"
#: Messages a user sends within this many seconds of each other, still waiting when the
#: model is called, are one question split over several messages: asked and answered once.
MERGE_WINDOW = 20.0
#: A question is cut to this many characters before it reaches the model (budget).
MAX_QUESTION_CHARS = 4000
TRUNCATED_NOTE = "\n\n（以上消息过长，已截断，只保留了前 {chars} 字。）"


#: Sent once to a reader whose question waits for the model to come back (WXBOT_HOLD).
HOLD_LINE = "模型服务暂时中断了，你的问题已记下，恢复后我会第一时间回答你。"
#: The longest WXBOT_HOLD: an answer must still fit in WeChat's 48 h window after it.
HOLD_LIMIT = 47 * 3600.0


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


def _number_between(low: float, high: float, unit: str = "",
                    number: type = float) -> Callable[[str], float]:
    """A parser of a number (float, or int: a whole one) from low to high, in `unit`."""
    what, unit = (f"a number of {unit}", f" {unit}") if unit else ("a whole number", "")

    def parse(value: str) -> float:
        try:
            parsed = number(value.strip())
        except ValueError:
            raise ValueError(f"must be {what}, got {value.strip()!r}") from None
        if not low <= parsed <= high:
            raise ValueError(f"must be between {low} and {high}{unit}, got {parsed}")
        return parsed
    return parse


def _int_between(low: int, high: int) -> Callable[[str], int]:
    return _number_between(low, high, number=int)


_seconds = _number_between(0, 86400 * 7, "seconds")
#: Retention: a fraction of a day compresses it for a soak test.
_days = _number_between(0, 36500, "days")


def _hold_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds > HOLD_LIMIT:  # customer-service messages reach a reader for 48 h (45015)
        raise ValueError(f"must be at most {HOLD_LIMIT:.0f} seconds (47 h): WeChat lets an "
                         f"answer reach its reader for 48 h after the question")
    return seconds


def _url(value: str) -> str:
    value = value.strip().rstrip("/")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        shown = masked_url(value)
        if "@" in shown.replace("***@", ""):  # a password where no URL can be read
            shown = "***@" + shown.rpartition("@")[2]
        raise ValueError(f"must be an http:// or https:// URL, got {shown!r}")
    return value


def _optional_url(value: str) -> str:
    return _url(value) if value.strip() else ""


#: Parameters that carry a credential (?api_key=..., Azure's ?code=..., ?sk=..., ;key=...).
CREDENTIAL_PARAM = re.compile(r"key|token|secret|sig|pass|pwd|auth|code|credential|"
                              r"(?:^|[_-])[as]k(?:$|[_-])", re.I)
#: A parameter in a URL's path or query: ?name=value, &name=value, ;name=value.
_URL_PARAM = re.compile(r"(?<=[?&;])([^=&;#/?]+)=([^&;#/?]*)")
#: A path segment that is a key rather than a name: sk-..., or a long run of letters and
#: digits mixed (/bot123456:AAH.../, /v1/keys/4f9a0c...).
_KEY_SEGMENT = re.compile(r"(?:sk|ak|key|token)[-_:][\w:-]{6,}|"
                          r"(?=[\w:-]*[0-9])(?=[\w:-]*[A-Za-z])[\w:-]{24,}", re.I | re.A)


def _url_secrets(url: str) -> tuple[urllib.parse.SplitResult, str, list[tuple[int, int]]]:
    """The URL's parts, its user:password@ (or ""), and where in its path and query (after
    "scheme://host") its credentials are, as (start, end) of each."""
    parts = urllib.parse.urlsplit(url)
    rest = url[url.index(parts.netloc) + len(parts.netloc):] if parts.netloc else url
    found = [match.span(2) for match in _URL_PARAM.finditer(rest)
             if match.group(2) and CREDENTIAL_PARAM.search(match.group(1))]
    found += [match.span() for match in re.finditer(r"[^/?#;]+", rest.split("?")[0])
              if _KEY_SEGMENT.fullmatch(match.group())]
    return parts, parts.netloc.rpartition("@")[0], sorted(found)


def _replaced(rest: str, spans: list[tuple[int, int]], by: str) -> str:
    for start, end in reversed(spans):
        rest = rest[:start] + by + rest[end:]
    return rest


def url_credentials(url: str) -> list[str]:
    """The credentials written into a URL: user:password@, key-like parameters' values and
    key-like path segments."""
    parts, userinfo, spans = _url_secrets(url)
    rest = url[url.index(parts.netloc) + len(parts.netloc):] if parts.netloc else url
    found = (userinfo.split(":", 1) if userinfo else []) + [rest[a:b] for a, b in spans]
    return [form for raw in found if raw for form in {raw, urllib.parse.unquote(raw)}]


def masked_url(url: str) -> str:
    """The URL with its credentials replaced by ***, for the log and the console."""
    parts, userinfo, spans = _url_secrets(url)
    if not parts.netloc:
        return _replaced(url, spans, "***")
    at = url.index(parts.netloc)
    host = parts.netloc.rpartition("@")[2]
    return (url[:at] + (f"***@{host}" if userinfo else host)
            + _replaced(url[at + len(parts.netloc):], spans, "***"))


def shown_url(url: str) -> str:
    """A learned page's URL as readers are shown it: without user:password@ and without the
    parameters that carry a credential (the link a reader opens holds no one's token)."""
    parts = urllib.parse.urlsplit(url)
    query = "&".join(pair for pair in re.split("[&;]", parts.query) if pair and not
                     CREDENTIAL_PARAM.search(pair.partition("=")[0]))
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2],
                                                  query=query))


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


#: The console's password: long enough that 5 tries a minute (ConsoleGuard) never guess it.
ADMIN_PASSWORD_MIN = 12


def _admin_password(value: str) -> str:
    if value and len(value) < ADMIN_PASSWORD_MIN:
        raise ValueError(f"must be at least {ADMIN_PASSWORD_MIN} characters (or empty: no "
                         f"console); e.g. python3 -c 'import secrets; "
                         f"print(secrets.token_urlsafe(16))'")
    return value


def _networks(value: str) -> tuple[str, ...]:
    try:
        return tuple(str(ipaddress.ip_network(part.strip(), strict=False))
                     for part in value.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"must be IP addresses or networks, comma-separated (127.0.0.1, "
                         f"10.0.0.0/8), got {value!r}") from None


def _token(value: str) -> str:
    value = _text(value)
    # WeChat allows 3 to 32 characters; one signed URL from a log is enough to recover a short
    # token by trying every candidate, and with it to sign any push.
    if not 8 <= len(value) <= 32:
        got = f"got {len(value)} characters"
    # WeChat's console takes letters and digits only: no push would ever be signed with it.
    elif not re.fullmatch(r"[A-Za-z0-9]+", value):
        got = "got other characters too (such as - or _)"
    else:
        return value
    raise ValueError(
        f"must be 8 to 32 letters or digits, {got}: choose a new Token "
        f"in 公众号后台 → 设置与开发 → 基本配置 → 服务器配置 → 修改配置, put the same value "
        f"here, restart wxbot, then 提交 the 服务器配置")


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


def _words(value: str) -> tuple[str, ...]:
    """Comma-separated words (either comma), as classify() compares them: normalised."""
    return tuple(word for word in (normalise(part) for part in re.split(r"[,，]", value))
                 if word)


def _hours(value: str) -> float:
    try:
        hours = float(value)
    except ValueError:
        hours = math.nan
    if not 0 < hours <= 48 * 30:
        raise ValueError(f"must be hours above 0, not {value!r}")
    return hours


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one setting is read: its variable, default (None: required), parser and help."""

    env: str
    default: str | None
    parse: Callable[[str], object]
    help: str
    secret: bool = False
    #: Names a file: a relative path in an env file is read beside that file.
    file: bool = False


#: Every setting, in the order --help and the start-up log show them.
SETTINGS: dict[str, Setting] = {
    "token": Setting("WXBOT_TOKEN", None, _token,
                     "a Token you choose (8–32 letters or digits), pasted in 公众号后台 → 服务器配置", secret=True),
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
    "replies": Setting("WXBOT_REPLIES", "", _optional_text,
                       "JSON file of fixed replies to keywords and menu clicks, no model "
                       "(empty: none; re-read when it changes)", file=True),
    "blocked_words": Setting("WXBOT_BLOCKED_WORDS", "", _optional_text,
                             "file of blocked words, one a line: questions with one are not "
                             "asked, answers have them masked (empty: none)", file=True),
    "blocked_reply": Setting("WXBOT_BLOCKED_REPLY", REFUSED_LINE, _text,
                             "what a user whose question has a blocked word gets"),
    "vision": Setting("WXBOT_VISION", "0", _flag,
                      "1: send images to the model (it must accept image input)"),
    "image_model": Setting("WXBOT_IMAGE_MODEL", "", _optional_text,
                           "model of the Images API that draws for 画 / 画一张 / /draw, e.g. "
                           "dall-e-3 (empty: no drawing, 画 ... is a question)"),
    "image_base_url": Setting("WXBOT_IMAGE_BASE_URL", "", _optional_url,
                              "base URL of the Images API when the chat provider has none "
                              "(empty: OPENAI_BASE_URL)"),
    "image_api_key": Setting("WXBOT_IMAGE_API_KEY", "", _optional_text,
                             "API key for WXBOT_IMAGE_BASE_URL (empty: OPENAI_API_KEY)",
                             secret=True),
    "image_daily": Setting("WXBOT_IMAGE_DAILY", "10", _int_between(0, 10000),
                           "images one user may have drawn per 24 h, on top of the model call "
                           "limits (0: no limit)"),
    "session_ttl": Setting("WXBOT_SESSION_TTL", "86400", _seconds,
                           "earlier turns older than this many seconds are not sent to the model"),
    "db": Setting("WXBOT_DB", "wxbot.db", _text, "SQLite database file", file=True),
    "retention_days": Setting("WXBOT_RETENTION_DAYS", "30", _days,
                              "days messages, answers and history are kept (0: for ever; a "
                              "fraction such as 0.01 for a soak test); older ones are deleted "
                              "every hour (a 24th of the retention if shorter), a few hundred "
                              "at a time"),
    "host": Setting("WXBOT_HOST", "0.0.0.0", _text, "address to listen on"),
    "port": Setting("WXBOT_PORT", "8080", _int_between(0, 65535), "port to listen on"),
    "path": Setting("WXBOT_PATH", "/wx", _url_path, "URL path WeChat calls"),
    "workers": Setting("WXBOT_WORKERS", "32", _int_between(1, 256),
                       "worker threads: model calls in parallel (keep within the provider's "
                       "concurrency and RPM limits; see README)"),
    "queue_notice": Setting("WXBOT_QUEUE_NOTICE", "20", _seconds,
                            "a message that will wait longer than this many seconds for a "
                            "worker gets a line saying how long, at once (0: never)"),
    "history_turns": Setting("WXBOT_HISTORY_TURNS", "10", _int_between(0, 100),
                             "earlier exchanges (question and answer) sent to the model"),
    "max_skew": Setting("WXBOT_MAX_SKEW", "300", _int_between(0, 86400),
                        "reject pushes whose timestamp is further than this from now, in "
                        "seconds (0: off)"),
    "model_timeout": Setting("WXBOT_MODEL_TIMEOUT", "60", _seconds,
                             "deadline in seconds for one whole model call, first token to "
                             "last; the answer is cut there"),
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
    "hold": Setting("WXBOT_HOLD", "1800", _hold_seconds,
                    "seconds a question waits for a model that fails for everyone (an "
                    "outage) before its reader gets the apology; at most 47 h, inside "
                    "WeChat's 48 h window (0: apologise after 3 tries)"),
    "search_words": Setting("WXBOT_SEARCH_WORDS", "1", _flag,
                            "1: when a question's own words meet no article well, one short "
                            "model call writes the words an article would use (牙医 → 口腔科) "
                            "and the articles are searched again; 0: off"),
    "embed_model": Setting("WXBOT_EMBED_MODEL", "", _optional_text,
                           "embeddings model that also searches the articles by meaning, e.g. "
                           "text-embedding-3-small, text-embedding-v3, BAAI/bge-m3, bge-m3 "
                           "(empty: the word search alone)"),
    "embed_base_url": Setting("WXBOT_EMBED_BASE_URL", "", _optional_url,
                              "base URL of the embeddings API when the chat provider has none "
                              "(DeepSeek) (empty: OPENAI_BASE_URL)"),
    "embed_api_key": Setting("WXBOT_EMBED_API_KEY", "", _optional_text,
                             "API key for WXBOT_EMBED_BASE_URL (empty: OPENAI_API_KEY)",
                             secret=True),
    "learn_published": Setting("WXBOT_LEARN_PUBLISHED", "1", _flag,
                               "1: once `learn --published` has run, learn each article the "
                               "account publishes as WeChat announces it, and check the whole "
                               "list once a day (new, changed, deleted); 0: off"),
    "learn_private": Setting("WXBOT_LEARN_PRIVATE", "0", _flag,
                             "1: `learn URL` may read pages on this machine and private networks "
                             "(an intranet wiki); 0: such addresses are refused, whoever names "
                             "them (a page's redirect, a name that points inside)"),
    "admin_password": Setting("WXBOT_ADMIN_PASSWORD", "", _admin_password,
                              "password of the owner's web console, at least 12 characters "
                              "(empty: no console; /metrics alone listens)", secret=True),
    "admin_host": Setting("WXBOT_ADMIN_HOST", "127.0.0.1", _text,
                          "address the console listens on (reach it by ssh -L or a proxy)"),
    "admin_port": Setting("WXBOT_ADMIN_PORT", "8081", _int_between(0, 65535),
                          "port the console listens on"),
    "backup_keep": Setting("WXBOT_BACKUP_KEEP", "7", _int_between(1, 10000),
                           "`backup FOLDER` keeps this many of its latest copies there"),
    "trusted_proxies": Setting("WXBOT_TRUSTED_PROXIES", "", _networks,
                               "addresses of the proxies (nginx) in front of the console, "
                               "comma-separated (127.0.0.1, 10.0.0.0/8): only their X-Real-IP "
                               "and X-Forwarded-Proto are believed; empty: no one's"),
    "handoff": Setting("WXBOT_HANDOFF", "console", _choice("console", "wechat"),
                       "who answers a reader handed to a person: console (the owner writes "
                       "from the console's conversation page); wechat (their messages go to "
                       "WeChat's own 客服 by the passive transfer_customer_service reply)"),
    "handoff_hours": Setting("WXBOT_HANDOFF_HOURS", "12", _hours,
                             "hours the bot stays quiet for a reader once a person answers or "
                             "is asked for (交还机器人 in the console ends it sooner)"),
    "handoff_words": Setting("WXBOT_HANDOFF_WORDS", "人工,转人工,人工客服,找真人,真人客服",
                             _words, "what a reader writes to ask for a person "
                             "(comma-separated; empty: readers cannot ask)"),
    "notify_url": Setting("WXBOT_NOTIFY_URL", "", _optional_url,
                          "where the owner is told what matters: a 企业微信, 飞书 or 钉钉 group "
                          "robot's webhook, or any URL (plain JSON) (empty: not told)",
                          secret=True),
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
    replies: str
    blocked_words: str
    blocked_reply: str
    vision: bool
    image_model: str
    image_base_url: str
    image_api_key: str
    search_words: bool
    embed_model: str
    embed_base_url: str
    embed_api_key: str
    image_daily: int
    session_ttl: float
    db: str
    retention_days: float
    host: str
    port: int
    path: str
    workers: int
    queue_notice: float
    history_turns: int
    max_skew: int
    model_timeout: float
    max_tokens: int
    user_rate: int
    user_daily: int
    context_chars: int
    stop_timeout: float
    retry_base: float
    hold: float
    learn_published: bool
    learn_private: bool
    admin_password: str
    admin_host: str
    admin_port: int
    backup_keep: int
    trusted_proxies: tuple[str, ...]
    handoff: str
    handoff_hours: float
    handoff_words: tuple
    notify_url: str

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
        if values.get("embed_base_url") and not values.get("embed_api_key") and \
                host_name(values["embed_base_url"]) != host_name(
                    values.get("openai_base_url") or "https://api.openai.com/v1"):
            problems.append("WXBOT_EMBED_API_KEY is missing: WXBOT_EMBED_BASE_URL names another "
                            "provider than OPENAI_BASE_URL, and the chat provider's key is not "
                            "sent to another (set that provider's key)")
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    def secrets(self) -> list[str]:
        """The secret values, for the log filter that keeps them out of every line."""
        return [getattr(self, name) for name, s in SETTINGS.items() if s.secret
                and getattr(self, name)] + [
            credential for name, s in SETTINGS.items() if s.parse in (_url, _optional_url)
            for credential in url_credentials(getattr(self, name))]

    def describe(self) -> str:
        """The effective settings for the start-up log, secrets masked."""
        return " ".join(f"{env}={value}" for env, value in self.shown())

    def shown(self) -> list[tuple[str, str]]:
        """Each setting's variable and its value as the log and the console show it: secrets
        as (set), passwords in URLs masked, long texts by their length."""
        shown = []
        for name, setting in SETTINGS.items():
            value = getattr(self, name)
            if setting.secret:
                value = "(set)" if value else "(not set)"
            elif setting.parse in (_url, _optional_url):
                value = masked_url(value)
            elif name == "admins":
                value = ",".join(short_id(openid) for openid in value)
            elif name in ("system_prompt", "welcome", "blocked_reply"):
                value = f"({len(value)} chars)"
            shown.append((setting.env, str(value)))
        return shown


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, quotes). A
    relative path in a setting that names a file is read beside the env file, wherever
    wxbot is started from (the unit starts it in the env file's folder)."""
    values = {}
    beside = {setting.env for setting in SETTINGS.values() if setting.file}
    folder = os.path.dirname(os.path.abspath(path))
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
                raise SettingsError([f"{path}:{number}: expected KEY=VALUE, such as "
                                     f"WXBOT_PORT=8080 (the line is not shown: it may hold a "
                                     f"key; a name is letters, digits and _, then =)"])
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
                if line.partition("=")[2].strip()[0] == '"':
                    value = re.sub(r'\\(["\\$`n])',
                                   lambda m: "\n" if m.group(1) == "n" else m.group(1), value)
            if key in beside and value.strip() not in ("", ":memory:") and \
                    not value.startswith("file:"):  # SQLite's names for no file, a URI
                value = os.path.join(folder, value.strip())
            values[key] = value
    return values


###############################################################################
# Logging #####################################################################
###############################################################################

class SecretFilter(logging.Filter):
    """Scrubs secrets and access tokens from every log record, whatever put them there.

    A secret of 8 characters or more is masked wherever it appears; a shorter one (a local
    model's API key may be "ollama") only where it stands alone, so it does not garble words.
    """

    TOKEN_IN_URL = re.compile(r"(access_token=)[^&\s'\"]+")

    def __init__(self):
        super().__init__()
        self._secrets: set[str] = set()
        # A fetched access token replaces the one before, which expires in minutes at most:
        # the current and the previous are masked, older ones are no longer kept.
        self._access_tokens: collections.deque[str] = collections.deque(maxlen=2)
        self._pattern: re.Pattern | None = None
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        """A secret from the settings, masked for the life of the process."""
        if secret and secret not in self._secrets:
            with self._lock:
                self._secrets.add(secret)
                self._compile()

    def add_settings(self, settings: "Settings") -> None:
        """Every secret the settings hold, credentials in their URLs included."""
        for secret in settings.secrets():
            self.add(secret)

    def add_access_token(self, token: str) -> None:
        """The access token in use; called on every use, so it costs nothing when unchanged."""
        if token and token not in self._access_tokens:
            with self._lock:
                if token not in self._access_tokens:
                    self._access_tokens.append(token)
                    self._compile()

    def _compile(self) -> None:
        secrets = sorted(self._secrets | set(self._access_tokens), key=len, reverse=True)
        self._pattern = re.compile("|".join(
            re.escape(secret) if len(secret) >= 8 else rf"(?<![\w-]){re.escape(secret)}(?![\w-])"
            for secret in secrets))

    def scrub(self, text: str) -> str:
        text = self.TOKEN_IN_URL.sub(r"\1***", text)
        pattern = self._pattern
        return pattern.sub("***", text) if pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = self.scrub(message), None
        return True


#: Installed on the root handlers by main() and by tests; the token client adds new tokens.
SECRET_FILTER = SecretFilter()


class Failing:
    """Something that fails again and again (a provider, a URL) is logged when it starts to
    fail and when it works again, not at each failure."""

    def __init__(self):
        self.failing = False

    def turned(self, failed: bool) -> bool:
        """Note how a try went; True when it went otherwise than the last (a line is due)."""
        turned, self.failing = failed != self.failing, failed
        return turned


class LogThrottle:
    """At most one log line per key (a client address) per `period` seconds.

    Refused requests come at an attacker's pace; the log should not. At most `capacity` keys
    are remembered; when all of them logged within the period, a new key stays quiet.
    """

    def __init__(self, period: float = 60.0, capacity: int = 10000):
        self.period, self.capacity = period, capacity
        # key -> [when it last logged, lines held back since], oldest line first
        self._logged: collections.OrderedDict[str, list] = collections.OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, now: float) -> int | None:
        """None: stay quiet; else log, with the number of lines held back since the last."""
        with self._lock:
            entry = self._logged.get(key)
            if entry is not None and entry[0] > now - self.period:
                entry[1] += 1
                return None
            if entry is None and len(self._logged) >= self.capacity:
                if next(iter(self._logged.values()))[0] > now - self.period:
                    return None
                self._logged.popitem(last=False)
            self._logged[key] = [now, 0]
            self._logged.move_to_end(key)
            return entry[1] if entry else 0


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
    KEYWORD = "keyword"    # one of the owner's keywords (WXBOT_REPLIES): a fixed reply
    DRAW = "draw"          # 画 / 画一张 / /draw, when drawing is on: text is what to draw
    EVENT = "event"        # subscribe, CLICK, LOCATION...: answered as an event, never a question
    PERSON = "person"      # asks for a person (WXBOT_HANDOFF_WORDS): 转人工


@dataclasses.dataclass(frozen=True)
class Intent:
    """A message as classify() reads it: its kind, and its text as the user wrote it."""

    kind: Kind
    text: str


_ASCII_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


def normalise(text: str) -> str:
    """The form in which a message is compared with the command words: full-width forms folded
    (NFKC: "／ＲＥＳＥＴ" is "/RESET"), surrounding spaces and punctuation dropped, ASCII
    lower-cased.

    Surrounding means anything but letters and digits ("继续。", " /reset ", "「帮助」!"); a
    leading "/" stays, it belongs to the command. Scanned from both ends: a pattern anchored
    at the end is tried from every character, quadratic on "a", many spaces, "b"."""
    text = unicodedata.normalize("NFKC", text)
    start, end = 0, len(text)
    while start < end and not text[start].isalnum() and text[start] != "/":
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return text[start:end].translate(_ASCII_LOWER)


#: A message longer than this (normalised) is a question, whatever person word it holds.
PERSON_MESSAGE_MOST = 12

#: Each command word, normalised, and the kind of message it makes.
WORDS: dict[str, Kind] = {normalise(word): kind for words, kind in [
    (CONTINUE_WORDS, Kind.CONTINUE), (RESET_WORDS, Kind.RESET), (HELP_WORDS, Kind.HELP),
    (("/stats",), Kind.STATS)] for word in words}


#: What a message asking for a person may hold beside the word (我要转人工, 请帮我找真人客服吧).
PERSON_ASKING = frozenset("我要想请帮给找转接一下个你们的吧啊呀呢吗好快点")


def asks_for_person(word: str, person_words: Sequence[str]) -> bool:
    """Whether a normalised message asks for a person: it is one of the words, or one of them
    with nothing but asking around it (我要转人工); 人工智能是什么 and 人工客服电话是多少 are
    questions."""
    return word in person_words or len(word) <= PERSON_MESSAGE_MOST and any(
        person in word and set(word.replace(person, "")) <= PERSON_ASKING
        for person in person_words)


def classify(msg_type: str, content: str | None, keywords: Container[str] = (),
             drawing: bool = False, person_words: Sequence[str] = ()) -> Intent:
    """What a message is. The one place that decides it: service and passive replies, the
    merging of quick follow-ups and the fixed replies all ask here. A spoken command counts
    as typed. `keywords` are the owner's, normalised (Replies.keywords); `drawing`: whether
    WXBOT_IMAGE_MODEL is set (when it is not, 画 ... is a question like any other);
    `person_words`: WXBOT_HANDOFF_WORDS."""
    if msg_type == "event":
        return Intent(Kind.EVENT, "")
    text = (content or "").strip()
    if msg_type not in ("text", "voice"):
        return Intent(Kind.QUESTION, text)
    word = normalise(text)
    kind = WORDS.get(word) or (Kind.KEYWORD if word in keywords else None) or (
        Kind.PERSON if asks_for_person(word, person_words) else None)
    if kind is None and drawing:
        folded = unicodedata.normalize("NFKC", text).translate(_ASCII_LOWER)
        for draw_word in DRAW_WORDS:
            rest = folded[len(draw_word):]
            if folded.startswith(draw_word) and not DRAW_QUESTION.search(folded) and \
                    (draw_word != "/draw" or rest[:1] in ("", " ", ":", "：")):
                return Intent(Kind.DRAW, rest.strip(" :：,，。.!！"))
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
    DEAD = "dead"        # gave up (delivery failures or interruptions); kept for the operator


#: Each state in the owner's words (the console).
STATE_WORDS = {State.QUEUED: "排队中", State.LEASED: "回答中", State.DONE: "已回答",
               State.FAILED: "失败，已致歉", State.DEAD: "未送达"}


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
    attempts    INTEGER NOT NULL DEFAULT 0,  -- claims so far: names the lease (fencing)
    lease_until REAL,
    not_before  REAL NOT NULL DEFAULT 0,
    answered_at REAL,
    merged_into INTEGER REFERENCES messages (id),
    needs_model INTEGER NOT NULL DEFAULT 1,  -- 0: answered from what is stored (a Sender may)
    error       TEXT,
    model_failures    INTEGER NOT NULL DEFAULT 0,
    delivery_failures INTEGER NOT NULL DEFAULT 0,
    interruptions     INTEGER NOT NULL DEFAULT 0  -- lease expired, restart, internal error
);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, id);
CREATE INDEX IF NOT EXISTS messages_user ON messages (openid, state, id);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
CREATE INDEX IF NOT EXISTS messages_merged ON messages (merged_into)
    WHERE merged_into IS NOT NULL;

-- /healthz counts messages by state from here, kept exact by the triggers below: counting
-- a million rows on every health check would not be.
CREATE TABLE IF NOT EXISTS state_counts (
    state    TEXT PRIMARY KEY,
    messages INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO state_counts (state, messages)
    VALUES {", ".join(f"('{s.value}', 0)" for s in State)};
CREATE TRIGGER IF NOT EXISTS messages_counted AFTER INSERT ON messages BEGIN
    UPDATE state_counts SET messages = messages + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS messages_recounted AFTER UPDATE OF state ON messages
WHEN OLD.state != NEW.state BEGIN
    UPDATE state_counts SET messages = messages - 1 WHERE state = OLD.state;
    UPDATE state_counts SET messages = messages + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS messages_uncounted AFTER DELETE ON messages BEGIN
    UPDATE state_counts SET messages = messages - 1 WHERE state = OLD.state;
END;

CREATE TABLE IF NOT EXISTS segments (
    message_id INTEGER NOT NULL REFERENCES messages (id),
    seq        INTEGER NOT NULL,
    content    TEXT NOT NULL CHECK (content != ''),
    carried    INTEGER NOT NULL DEFAULT 0,
    tried_at   REAL,
    sent_at    REAL,
    replied_to INTEGER REFERENCES messages (id),
    moved_to   INTEGER REFERENCES messages (id),
    image      INTEGER,  -- images.message_id: this segment is that picture, not its content
    -- A carried segment: the message whose answer it is (NULL: this message's own).
    origin     INTEGER REFERENCES messages (id),
    -- An article's card (WECHAT.md §9): the custom/send message it is, as JSON without
    -- touser. Its content is the 来源 line the card stands for, sent if WeChat refuses the card.
    -- A card goes only within its answer's quota: never carried, never handed out passively.
    card       TEXT,
    PRIMARY KEY (message_id, seq)
);
CREATE INDEX IF NOT EXISTS segments_replied ON segments (replied_to)
    WHERE replied_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS segments_origin ON segments (origin)
    WHERE origin IS NOT NULL;
CREATE INDEX IF NOT EXISTS segments_unsent ON segments (message_id)
    WHERE sent_at IS NULL AND moved_to IS NULL;

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

-- A drawing (WXBOT_IMAGE_MODEL), one per message. Each step is stored before the next is
-- taken, so a restart never pays for a second picture nor uploads one twice: the row
-- (counted in WXBOT_IMAGE_DAILY), then the picture's bytes, then WeChat's media_id, which
-- lives 3 days. The bytes are dropped once the picture went out.
CREATE TABLE IF NOT EXISTS images (
    message_id  INTEGER PRIMARY KEY REFERENCES messages (id),
    openid      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    asked_at    REAL NOT NULL,
    bytes       BLOB,
    media_id    TEXT,
    uploaded_at REAL
);
CREATE INDEX IF NOT EXISTS images_user ON images (openid, asked_at);

CREATE TABLE IF NOT EXISTS kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    expires_at REAL
);
"""
SCHEMA_VERSION = 6
#: After tables an earlier wxbot made were brought up to date: the state counts made exact
#: (a database older than state_counts gets the table, and its counts, here).
RECOUNT = ("UPDATE state_counts SET messages = (SELECT count(*) FROM messages m"
           " WHERE m.state = state_counts.state)")


def sql_statements(script: str) -> Iterator[str]:
    """The statements of a schema string one by one (a trigger's body is part of its own)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


def table_columns(script: str) -> dict[str, dict[str, str]]:
    """Each table a schema string creates: its columns' names and definitions, in order."""
    tables = {}
    for statement in sql_statements(script):
        text = "\n".join(line.split("--")[0] for line in statement.splitlines())
        head, _, body = text.partition("(")
        words = head.split()
        if words[:2] != ["CREATE", "TABLE"]:
            continue
        parts, depth, quoted, part = [], 0, False, ""
        for char in body[:body.rindex(")")]:
            quoted ^= char == "'"  # a comma or a bracket in DEFAULT 'a,(b' is text
            depth += (not quoted) * ((char == "(") - (char == ")"))
            if char == "," and depth == 0 and not quoted:
                parts.append(part)
                part = ""
            else:
                part += char
        parts.append(part)
        tables[words[-1]] = {
            part.split()[0]: " ".join(part.split()[1:]) for part in parts
            if part.split()[0].upper() not in ("PRIMARY", "UNIQUE", "CHECK", "FOREIGN",
                                               "CONSTRAINT")}
    return tables


def upgrade_tables(conn: sqlite3.Connection, script: str) -> list[str]:
    """Bring the tables of a schema string up to date in the open transaction, whatever wxbot
    made them: the columns a table lacks are added (the first releases added columns without
    a new user_version, so only the columns present tell what a database holds), then the
    script creates the tables and indexes that are new. Other tables are left as they are: a
    feature with tables of its own calls this with its own schema string.

    Returns what changed, as `table.column` and `table` names, for the log.
    """
    present = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    changed = []
    for table, columns in table_columns(script).items():
        if table not in present:
            changed.append(table)
            continue
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column, definition in columns.items():
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                changed.append(f"{table}.{column}")
    for statement in sql_statements(script):
        conn.execute(statement)
    return changed


#: A message interrupted this often (its lease expired, a restart, an internal error) ends
#: dead: something about it stops every worker, and trying forever would hide that.
INTERRUPTIONS_LIMIT = 5
#: The oldest message a worker may take (:now): due, and its user has nothing earlier queued
#: or in hand (one user's messages are answered in order). A message whose answer is stored
#: already (a fixed reply, Store.reply_at_once) waits only for the user's other such ones:
#: it goes out at once, not after the model's answer to an earlier question. :ready_only
#: takes only messages that need no model (Sender): those, and the ones answered from what
#: is stored (needs_model: 继续, /help, the welcome...), which keep the order rule; but such
#: a message passes a question waiting for the model's next try (not_before: held through an
#: outage for up to WXBOT_HOLD, Outage), or 转人工 would wait as long as the model is down.
CLAIMABLE = ("SELECT m.id FROM messages m WHERE m.state = 'queued' AND m.not_before <= :now"
             " AND (m.answered_at IS NOT NULL OR NOT m.needs_model OR NOT :ready_only)"
             " AND NOT EXISTS (SELECT 1 FROM messages o WHERE o.openid = m.openid"
             " AND o.state IN ('queued', 'leased') AND (o.id < m.id OR o.state = 'leased')"
             " AND (m.answered_at IS NULL OR o.answered_at IS NOT NULL)"
             " AND (m.needs_model OR o.state = 'leased' OR o.not_before <= :now"
             " OR o.answered_at IS NOT NULL OR NOT o.needs_model))"
             " ORDER BY m.id LIMIT 1")
#: The kv key noting that the queue line went out for a message: it used one of the 5.
QUEUE_LINE_KEY = "queue-line:{}"
#: The kv key counting the messages sent on a user message's quota that are not segments
#: of its answer: the owner's own (OwnerAnswers), the apology of an answer asked again.
QUOTA_USED_KEY = "quota-used:{}"
#: The kv key noting that a user over a limit was told so, until a place frees (kind:
#: "calls", WXBOT_USER_RATE/WXBOT_USER_DAILY; "own", a limit with a line of its own).
LIMIT_NOTICE_KEY = "limit-notice:{openid}:{kind}"
#: The user's segments of earlier, finished answers that never went out (:openid, :id).
EARLIER_UNSENT = (" FROM segments s JOIN messages m ON m.id = s.message_id"
                  " WHERE m.openid = :openid AND m.id < :id AND m.state = 'done'"
                  " AND s.sent_at IS NULL AND s.moved_to IS NULL AND s.card IS NULL")
#: The answer a segment `s` is part of: the message asked, wherever the segment was carried.
ANSWER_OF = "coalesce(s.origin, s.message_id)"
#: Whether any segment of the answer :answer went out, wherever it was carried.
ANSWER_BEGUN = ("EXISTS (SELECT 1 FROM segments b WHERE b.sent_at IS NOT NULL AND"
                " ((b.message_id = :answer AND b.origin IS NULL) OR b.origin = :answer))")


@dataclasses.dataclass(frozen=True)
class Message:
    """A claimed message as the worker sees it; `attempts` identifies the lease, and each
    failure counter counts one kind of failure before this claim."""

    id: int
    openid: str
    msg_type: str
    msg_id: str | None
    event: str | None
    content: str | None
    fields: dict
    received_at: float
    attempts: int
    model_failures: int
    delivery_failures: int
    interruptions: int


#: Bytes a second VACUUM rewrites on a small VPS (353 MB took 3.8 s): for the log's estimate.
COMPACT_RATE = 90e6
#: Bytes the WAL file keeps once a checkpoint has copied it into the database.
WAL_LIMIT = 4 << 20


def database_bytes(path: str) -> tuple[int, int]:
    """The database's bytes on disk: the file and its WAL (what `df` counts)."""
    sizes = []
    for name in (path, path + "-wal"):
        try:
            sizes.append(os.path.getsize(name))
        except OSError:
            sizes.append(0)
    return sizes[0], sizes[1]


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def disk_full(error: Exception) -> bool:
    """Whether SQLite failed for want of space (SQLITE_FULL): the disk or max_page_count."""
    return isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error)


class UserWakeups:
    """Wakes the webhook threads waiting for one user's passive reply, and no others.

    A write that concerns a user (a segment stored, a message settled) rings that user's
    bell; a waiting thread sleeps until its own rings or its time is up. No broadcast: with
    many users waiting at once, one user's answer wakes one thread.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, set[threading.Event]] = {}

    @contextlib.contextmanager
    def listen(self, openid: str) -> Iterator[threading.Event]:
        """An event set whenever something is written for the user, while in the block."""
        bell = threading.Event()
        with self._lock:
            self._waiting.setdefault(openid, set()).add(bell)
        try:
            yield bell
        finally:
            with self._lock:
                bells = self._waiting[openid]
                bells.discard(bell)
                if not bells:
                    del self._waiting[openid]

    def ring(self, openids: Iterable[str]) -> None:
        with self._lock:
            bells = [bell for openid in openids for bell in self._waiting.get(openid, ())]
        for bell in bells:
            bell.set()


class LeaseLost(Exception):
    """The lease expired and the message went back to the queue: stop, another worker has it."""


def create_private(path: str) -> None:
    """Create the database file readable by its owner only, before SQLite opens it: SQLite
    gives the -wal and -shm files the database file's permissions. Messages are private."""
    if path == ":memory:" or path.startswith("file:"):
        return
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a folder, not a database file", path)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            log.warning("the database %s is readable by other users (mode %o): run "
                        "chmod 600 %s*", path, mode, path)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no name on this system (a container's, a deleted user's)
        return f"uid {uid}"


def access_problem(path: str, write: bool) -> tuple[str, str | None, str] | None:
    """What keeps this user from reading the database at `path` (`write`: and changing it):
    (the reason, the user who owns what stands in the way or None when it is missing, the
    file or folder in the way); None when the modes allow it.

    os.path.exists() says False alike for a missing file and for one in a folder this user
    may not enter. In WAL mode a reader needs the -wal and -shm files too, or the right to
    create them in the folder.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        return (f"it is a folder: WXBOT_DB names the database file, e.g. "
                f"{os.path.join(path, SETTINGS['db'].default)}", "", path)

    def whose(name: str) -> tuple[str, str, str]:
        found = os.stat(name)
        what = "the folder " if os.path.isdir(name) else ""
        owner = user_name(found.st_uid)
        return f"{what}{name} is {owner}'s (mode {found.st_mode & 0o777:o})", owner, name

    step = ""
    for part in folder.split(os.sep):  # from / down: the first folder that shuts us out
        step = os.path.join(step, part) if step else os.sep
        if not os.path.isdir(step):
            return f"there is no folder {step}", None, step
        if not os.access(step, os.X_OK):
            return whose(step)
    if not write and not os.path.exists(path):
        return None  # nothing stands in the way: there is no database
    rights = os.R_OK | (os.W_OK if write else 0)
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            if not os.access(name, rights):
                return whose(name)
        elif not os.access(folder, os.W_OK | os.X_OK):  # SQLite must create it there
            return whose(folder)
    return None


class DatabaseUnusable(Exception):
    """This user may not open the database (WXBOT_DB) for writing; the text says why, whose
    it is, and what to do."""

    def __init__(self, path: str, error: Exception):
        reason, owner, where = access_problem(path, write=True) or (str(error), "", "")
        me = user_name(os.getuid())
        if owner is None:
            advice = "correct WXBOT_DB, or create its folder"
        elif os.path.isdir(path):
            advice = "correct WXBOT_DB"
        elif not owner:  # the modes allow it: something else refused (a read-only disk...)
            advice = "check WXBOT_DB and the folder's rights"
        elif owner == "root":  # a folder made by root for a service that runs as another user
            advice = (f"give it to {me} (sudo chown {me} {where}), or set WXBOT_DB to a "
                      f"file in a folder {me} may write")
        else:
            advice = (f"run wxbot as {owner}, or set WXBOT_DB to a file in a folder {me} "
                      f"may write")
        super().__init__(f"cannot open the database {path} (WXBOT_DB): {reason}: {advice}")


@contextlib.contextmanager
def opening_for(path: str) -> Iterator[None]:
    """Around opening the database: DatabaseUnusable where this user may not write it (a
    folder of another user's, a file of another user's, no folder at all)."""
    try:
        yield
    except OSError as error:
        raise DatabaseUnusable(path, error) from None
    except sqlite3.OperationalError as error:  # "attempt to write a readonly database"...
        if path == ":memory:" or path.startswith("file:") or \
                not access_problem(path, write=True):
            raise
        raise DatabaseUnusable(path, error) from None


class Store:
    """The SQLite database: queue, segments, history and the token cache."""

    #: Tries to empty the WAL after a retention pass, and the pause between them.
    CHECKPOINT_TRIES = 20
    CHECKPOINT_PAUSE = 0.05

    def __init__(self, path: str, busy_timeout: float = 15.0,
                 free_space: Callable[[str], int] = lambda dir: shutil.disk_usage(dir).free):
        if sqlite3.sqlite_version_info < (3, 35):  # UPDATE ... RETURNING claims a message
            raise RuntimeError(f"SQLite 3.35 or newer is needed; this Python has "
                               f"{sqlite3.sqlite_version} (use Debian 12 / Ubuntu 22.04 or newer)")
        with opening_for(path):
            create_private(path)
        self.path = path
        self.busy_timeout = busy_timeout
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        # SQLite makes a writer that finds the file locked sleep 1, 2, 5, 10... ms before it
        # tries again; under a burst of pushes that sleep is the ack's p99. Our own writers
        # take turns here instead, so only another process can make one wait. Pushes go
        # first: a webhook thread waits for the one write in progress at most, never behind
        # the workers' writes (WeChat gives up after 5 s and retries).
        self._turns = threading.Lock()
        self._push_turn = threading.Condition(self._turns)
        self._worker_turn = threading.Condition(self._turns)
        self._writing = False
        self._pending: list[dict] = []  # pushes waiting for their group commit
        self._local = threading.local()  # the thread's open write transaction, if any
        #: Rung after a write for a user, for webhook threads waiting for a passive reply.
        self.wakeups = UserWakeups()
        #: Set while writes fail for want of space; workers pause, the webhook answers 503.
        self.disk_full = False
        self._disk_lock = threading.Lock()
        self._full_since, self._refused = 0.0, 0  # pushes answered 503 while it is full
        #: Called when the disk fills up (the owner is told: Notifier).
        self.on_disk_full: Callable[[], object] | None = None
        with opening_for(path), self.connection() as conn:
            self._compactable(conn, free_space)
            # WAL lets the webhook commit while a worker reads; synchronous=NORMAL keeps every
            # commit through a process crash (kill -9), losing at most the last ones on power loss.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"{path} was written by a newer wxbot (schema {version})")
                changed = upgrade_tables(conn, SCHEMA)
                if version and changed:
                    conn.execute(RECOUNT)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.rollback()
            if version and changed:
                log.info("database %s brought up to date (schema %d to %d): added %s", path,
                         version, SCHEMA_VERSION, ", ".join(changed))
        with self.transaction() as conn:  # kept with the answers: links outlive a restart
            conn.execute("INSERT OR IGNORE INTO kv (key, value) VALUES ('continue-key', ?)",
                         (os.urandom(16).hex(),))
        self._continue_key = bytes.fromhex(self.get_kv("continue-key", 0))

    def _compactable(self, conn: sqlite3.Connection, free_space: Callable[[str], int]) -> None:
        """Let the file shrink: rows deleted by retention give their pages back to the disk.

        auto_vacuum must be chosen before the first table exists; a database made by an
        earlier wxbot is rewritten once (VACUUM: it locks the file while it runs, before wxbot
        listens, so WeChat's pushes meanwhile are not taken and it tries each again for 15 s:
        the log says how long to expect, and the README to upgrade in a quiet hour). The
        rewrite needs room for a copy of the file and its journal; without that room it waits
        for a later start, and the queue is served meanwhile (deleted rows' pages are reused).
        """
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
            return
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if not conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            return
        size = conn.execute("SELECT page_count * page_size FROM pragma_page_count, "
                            "pragma_page_size").fetchone()[0]
        needed = 2 * size  # the rewritten copy, then the journal that puts it in place
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            free = free_space(folder)
            if free >= needed:
                log.warning("compacting the database once so that deleted rows free disk "
                            "space: %s, about %.0f s (at %d MB/s), before wxbot listens; "
                            "pushes meanwhile are retried by WeChat for 15 s only: upgrade a "
                            "large database in a quiet hour", megabytes(size),
                            size / COMPACT_RATE, COMPACT_RATE / 1e6)
                started = time.monotonic()
                conn.execute("VACUUM")
                log.warning("compacted %s in %.1f s", self.path, time.monotonic() - started)
                return
            why = f"{free / 1e6:.0f} MB free in {folder}"
        except (OSError, sqlite3.Error) as error:
            why = str(error)
        log.warning("database %s not compacted (%s): it needs %.0f MB free; free some space "
                    "and restart wxbot to compact it, so that deleted rows give disk space "
                    "back (wxbot runs meanwhile)", self.path, why, needed / 1e6 + 1)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.busy_timeout, cached_statements=32)
        conn.row_factory = sqlite3.Row
        # Another process holding the file (a backup, sqlite3 shell) makes writers wait,
        # not fail: a push is still answered "success" once the lock is gone.
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous=NORMAL")
        # The WAL keeps the size of the largest run of writes between checkpoints (a
        # retention pass: tens of MB) unless told to give it back when it starts over.
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        # A page cache of 128 KiB a connection (SQLite's default is 2 MiB): a push or a step
        # of a worker touches a few pages of the queue's indexes, the rest is in the operating
        # system's cache, and a busy webhook holds a connection a thread (64 connections at
        # 512 KiB took the RSS past 100 MB).
        conn.execute("PRAGMA cache_size=-128")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection used by one thread at a time, returned to the pool afterwards; inside
        the thread's write transaction, that transaction's (its reads see its writes)."""
        joined = getattr(self._local, "conn", None)
        if joined is not None:
            yield joined
            return
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
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.execute("COMMIT")
            except sqlite3.OperationalError as error:
                if disk_full(error):
                    self._note_disk(full=True)
                raise
        if self.disk_full:
            self._note_disk(full=False)

    def _note_disk(self, full: bool) -> None:
        """Say once when the disk fills up, and once when there is room again."""
        with self._disk_lock:
            if self.disk_full == full:
                return
            self.disk_full = full
            refused, since = self._refused, self._full_since
            if full:
                self._full_since, self._refused = time.time(), 0
        if full:
            log.error("the disk holding %s is full: pushes are answered 503 so that WeChat "
                      "tries them again, and workers pause; free some space (df -h)", self.path)
            if self.on_disk_full:
                self.on_disk_full()
        else:
            log.warning("there is room on the disk again after %s: pushes are stored and "
                        "answered; %d push(es) were refused meanwhile (WeChat tries a push 3 "
                        "times within 15 s: one refused each time is lost)",
                        age_text(time.time() - since), refused)

    def refused_push(self) -> None:
        """A push was answered 503 for want of space: counted for the line when room is back."""
        with self._disk_lock:
            self._refused += 1

    def has_room(self) -> bool:
        """Whether a write that needs new space succeeds now (after the disk was full)."""
        try:
            with self.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES ('disk-probe',"
                             " zeroblob(16384))")
                conn.execute("DELETE FROM kv WHERE key = 'disk-probe'")
        except sqlite3.OperationalError as error:
            if disk_full(error):
                return False
            raise
        return True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, one writer at a time and after any waiting push; webhook
        threads waiting for a passive reply of a user whose message it changed hear of it.

        Opened inside another of the same thread, it is part of that one: a worker joins the
        writes of one step into one commit, one short turn of the write lock.
        """
        joined = getattr(self._local, "conn", None)
        if joined is not None:
            yield joined
            return
        touched = self._local.touched = set()
        with self.write_turn(), self._begin() as conn:
            self._local.conn = conn
            try:
                yield conn
            finally:
                self._local.conn = None
        self.wakeups.ring(touched)

    @contextlib.contextmanager
    def write_turn(self) -> Iterator[None]:
        """A turn to write that is not a push's: after the write in progress and any waiting
        push (the articles' writes take theirs here too)."""
        with self._turns:
            while self._writing or self._pending:
                self._worker_turn.wait()
            self._writing = True
        try:
            yield
        finally:
            self._end_turn()

    def _end_turn(self) -> None:
        with self._turns:
            self._writing = False
            self._push_turn.notify_all()  # pushes now stored, or waiting to lead the next batch
            if not self._pending:
                self._worker_turn.notify()

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    # Queue ------------------------------------------------------------------

    def store_push(self, push: "Push", now: float, needs_model: bool = True
                   ) -> tuple[int, int]:
        """Commit a push once under its dedup key: (message id, times WeChat pushed it);
        `needs_model`: whether its answer takes the model (the webhook's needs_model()).

        Group commit: whichever webhook thread gets the next turn to write commits every push
        waiting at that moment in one transaction; the others find theirs done. Under a burst
        that is one commit for many pushes, each still committed before it is acknowledged.
        """
        ticket, batch = {"push": push, "now": now, "needs_model": needs_model}, []
        with self._turns:
            self._pending.append(ticket)
            while self._writing and "stored" not in ticket:
                self._push_turn.wait()
            if "stored" not in ticket:
                self._writing = True
                batch, self._pending = self._pending, []
        if batch:
            try:
                self._commit_pushes(batch)
            finally:
                self._end_turn()
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
                        " content, fields, received_at, needs_model)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (dedup_key) DO UPDATE SET pushes = pushes + 1"
                        " RETURNING id, pushes",
                        (push.dedup_key, push.openid, push.msg_type, push.msg_id, push.event,
                         push.content,
                         # A text's fields are all in the columns: the hot path skips the
                         # JSON; a tapped 继续 keeps which answer it was for.
                         "{}" if push.msg_type == "text" and "bizmsgmenuid" not in push.fields
                         else
                         json.dumps(push.fields, ensure_ascii=False), ticket["now"],
                         ticket["needs_model"])
                    ).fetchone())
        except sqlite3.Error as error:
            for ticket in batch:
                ticket["stored"] = error

    def claim(self, now: float, lease_seconds: float, ready_only: bool = False
              ) -> Message | None:
        """Lease the oldest message whose user has nothing earlier queued or in hand;
        `ready_only`: only one whose answer is stored whole, ready to send (Sender)."""
        with self.connection() as conn:  # a claim that finds nothing takes no turn to write
            if not conn.execute(f"SELECT EXISTS ({CLAIMABLE}) OR EXISTS (SELECT 1 FROM"
                                " messages WHERE state = 'leased' AND lease_until < :now)",
                                {"now": now, "ready_only": ready_only}).fetchone()[0]:
                return None
        with self.transaction() as conn:
            self._interrupt(conn, "state = 'leased' AND lease_until < :now",
                            "its lease expired (the worker stopped or was too slow)", now=now)
            row = conn.execute(
                "UPDATE messages SET state = 'leased', lease_until = :until,"
                f" attempts = attempts + 1 WHERE id = ({CLAIMABLE})"
                " RETURNING id, openid, msg_type, msg_id, event, content, fields, received_at,"
                " attempts, model_failures, delivery_failures, interruptions",
                {"now": now, "until": now + lease_seconds, "ready_only": ready_only}
            ).fetchone()
        if row is None:
            return None
        return Message(**{**dict(row), "fields": json.loads(row["fields"])})

    def next_due(self, now: float, ready_only: bool = False) -> float | None:
        """When a message that cannot be claimed now may become claimable: a retry's time or a
        lease's end. (A message waiting behind its user's message in hand becomes claimable
        when that one finishes, and the worker that finishes it wakes the others.)
        `ready_only`: the retry of a message that needs no model (Sender); lease ends are
        the workers' to look at."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT min(CASE state WHEN 'queued' THEN not_before ELSE lease_until END)"
                " FROM messages WHERE (state = 'leased' AND NOT :ready_only) OR (state ="
                " 'queued' AND not_before > :now AND (answered_at IS NOT NULL OR NOT"
                " needs_model OR NOT :ready_only))", {"now": now, "ready_only": ready_only}
            ).fetchone()
        return row[0]

    def _leased(self, conn: sqlite3.Connection, message: Message, sql: str, **params) -> None:
        """Run an UPDATE on the message only while the caller still holds its lease."""
        cursor = conn.execute(
            sql + " WHERE id = :id AND state = 'leased' AND attempts = :attempts",
            {"id": message.id, "attempts": message.attempts, **params})
        if cursor.rowcount != 1:
            raise LeaseLost(message.id)
        self._local.touched.add(message.openid)  # every write of a worker passes here

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

    def declined(self, message: Message) -> None:
        """WeChat answered that it did not take the segment being sent (an errcode: -1 busy,
        48001...): it never arrived, so its next try is no repeat, and a passive reply may
        carry it."""
        with self.transaction() as conn:
            self._check_lease(conn, message)
            conn.execute("UPDATE segments SET tried_at = NULL WHERE message_id = ?"
                         " AND sent_at IS NULL", (message.id,))

    def renew_lease(self, message: Message, lease_until: float) -> None:
        """Keep the message while its answer takes long (a slow model): LeaseLost if too late."""
        with self.transaction() as conn:
            self._leased(conn, message, "UPDATE messages SET lease_until = :until",
                         until=lease_until)

    def release(self, message: Message, not_before: float, error: str,
                failure: str | None) -> None:
        """Put the message back in the queue, to be tried again from not_before, counting the
        failure ("model_failures" or "delivery_failures"; None: no fault of the message's)."""
        assert failure in ("model_failures", "delivery_failures", None)
        counted = f", {failure} = {failure} + 1" if failure else ""
        with self.transaction() as conn:
            self._leased(conn, message, "UPDATE messages SET state = 'queued', lease_until = NULL,"
                         " not_before = :not_before, error = :error" + counted,
                         not_before=not_before, error=error)

    def interrupt(self, message: Message, not_before: float, reason: str) -> None:
        """Give the message back after an error in the worker itself: an interruption."""
        with self.transaction() as conn:
            if not self._interrupt(conn, "id = :id AND state = 'leased' AND attempts = :attempts",
                                   reason, id=message.id, attempts=message.attempts,
                                   not_before=not_before):
                raise LeaseLost(message.id)

    def _interrupt(self, conn: sqlite3.Connection, where: str, reason: str,
                   not_before: float = 0, **params) -> int:
        """Requeue the leased messages `where` selects, counting an interruption; those
        interrupted INTERRUPTIONS_LIMIT times end dead. Returns how many there were."""
        rows = conn.execute(
            "UPDATE messages SET lease_until = NULL, interruptions = interruptions + 1,"
            " error = :reason, not_before = :not_before, state = CASE WHEN interruptions + 1"
            f" >= {INTERRUPTIONS_LIMIT} THEN 'dead' ELSE 'queued' END WHERE {where}"
            " RETURNING id, openid, state",
            {"reason": f"interrupted: {reason}", "not_before": not_before, **params}).fetchall()
        for row in rows:
            if row["state"] == State.DEAD:
                log_worker.error("message %s from %s: interrupted %d times, the last because "
                                 "%s; giving up (state dead, kept: `python wxbot.py status`, "
                                 "`python wxbot.py retry %s`)", row["id"],
                                 short_id(row["openid"]), INTERRUPTIONS_LIMIT, reason, row["id"])
        return len(rows)

    def finish(self, message: Message, state: State, error: str | None = None,
               failure: str | None = None) -> None:
        """End the message in `state`; `failure` names the count the last failure adds to."""
        assert failure in ("model_failures", "delivery_failures", None)
        counted = f", {failure} = {failure} + 1" if failure else ""
        with self.transaction() as conn:
            self._leased(conn, message, "UPDATE messages SET state = :state, lease_until = NULL,"
                         " error = :error" + counted, state=state.value, error=error)

    def release_all_leases(self) -> int:
        """Put every leased message back: called at start and stop, when no worker runs."""
        with self.transaction() as conn:
            return self._interrupt(conn, "state = 'leased'",
                                   "wxbot stopped while answering it")

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
            f"SELECT s.message_id, s.seq, s.content, s.image, {ANSWER_OF} AS answer,"
            " m.msg_type, m.error" + EARLIER_UNSENT + " ORDER BY m.id, s.seq",
            {"openid": message.openid, "id": message.id}).fetchall()
        # Begun or not is a matter of each answer (the message asked), not of the message
        # that carries it: a passive reply that carried an earlier answer began that one only.
        begun = {answer: conn.execute(f"SELECT {ANSWER_BEGUN}", {"answer": answer}).fetchone()[0]
                 for answer in {row["answer"] for row in earlier}}
        left = [row for row in earlier if row["error"] is None and begun[row["answer"]]]
        latest = left[-1]["answer"] if left and leftovers is Leftovers.TAKE else None
        carried = [row for row in earlier if row["error"] in ("errcode 45047", "errcode 45015")
                   or (row["error"] is None and row["msg_type"] != "event" and
                       (not begun[row["answer"]] or row["answer"] == latest))]
        # A superseded leftover is kept, never sent: moved_to names the message that
        # superseded it, and no copy is made.
        dropped = [row for row in left if row["answer"] != latest] \
            if leftovers is not Leftovers.KEEP else []
        conn.executemany("UPDATE segments SET moved_to = ? WHERE message_id = ? AND seq = ?",
                         [(message.id, row[0], row[1]) for row in carried + dropped])
        conn.executemany("INSERT INTO segments (message_id, seq, content, image, carried, origin)"
                         " VALUES (?, ?, ?, ?, 1, ?)",
                         [(message.id, seq, row["content"], row["image"], row["answer"])
                          for seq, row in enumerate(carried)])
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
                        question: str | None = None, answer: str | None = None,
                        note: str = "", card: "Card | None" = None) -> int:
        """Add the last segments, mark the answer complete and keep the exchange as history.
        `note` ends the answer: in its last segment, when that is text still unsent and it
        fits; else as a segment of its own. `card`, an article's, follows them all.

        Returns the number of segments the message has to send.
        """
        with self.transaction() as conn:
            if note:
                last = conn.execute(
                    "SELECT seq, content FROM segments WHERE message_id = ? AND carried = 0"
                    " AND image IS NULL AND sent_at IS NULL AND tried_at IS NULL"
                    " AND moved_to IS NULL AND seq = (SELECT max(seq) FROM segments"
                    " WHERE message_id = ?)", (message.id, message.id)).fetchone()
                if last and utf8_len(last["content"] + "\n\n" + note) <= SEGMENT_LIMIT:
                    conn.execute("UPDATE segments SET content = ? WHERE message_id = ?"
                                 " AND seq = ?", (last["content"] + "\n\n" + note, message.id,
                                                  last["seq"]))
                else:
                    segments = [*segments, note]
            planned = self._complete_answer(conn, message, now, segments, question, answer)
            if card:
                conn.execute("INSERT INTO segments (message_id, seq, content, card) VALUES"
                             " (?, (SELECT coalesce(max(seq) + 1, 0) FROM segments WHERE message_id = ?),"
                             " ?, ?)", (message.id, message.id, card.line,
                                        json.dumps(card.message, ensure_ascii=False)))
                planned += 1
            return planned

    def answer_room(self, message: Message) -> int:
        """How many more segments the message's answer may have within its quota."""
        with self.connection() as conn:
            planned = conn.execute("SELECT count(*) FROM segments WHERE message_id = ?"
                                   " AND moved_to IS NULL", (message.id,)).fetchone()[0]
        return self.quota(message) - planned

    def card_as_text(self, message_id: int, seq: int) -> None:
        """WeChat refused an article's card: the segment is the 来源 line it stands for."""
        with self.transaction() as conn:
            conn.execute("UPDATE segments SET card = NULL WHERE message_id = ? AND seq = ?",
                         (message_id, seq))

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

    def merge_followups(self, message: Message, now: float, keywords: Container[str] = (),
                        drawing: bool = False, person_words: Sequence[str] = ()) -> list[str]:
        """Texts the user sent right after this one and that still wait: asked together.

        Phones split one question over several quick messages; they get one answer.
        Returns every text merged into this message so far, oldest first. `keywords` (the
        owner's) are no question: they keep their fixed reply; nor is a drawing (`drawing`),
        nor 转人工 (`person_words`): it hands the reader to a person.
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
                        classify(row["msg_type"], row["content"], keywords, drawing,
                                 person_words).kind is not Kind.QUESTION \
                        or row["received_at"] - previous > MERGE_WINDOW:
                    break
                merged.append(row["id"])
                previous = row["received_at"]
            conn.executemany("UPDATE messages SET state = 'done', merged_into = ?,"
                             " answered_at = ? WHERE id = ?",
                             [(message.id, now, merged_id) for merged_id in merged])
            if merged:  # they get no line of their own: their answer is this message's
                log_worker.info("message %s from %s: quick follow-up(s) %s asked with it, one "
                                "answer", message.id, short_id(message.openid),
                                ", ".join(map(str, merged)))
            return [row[0] for row in conn.execute(
                "SELECT content FROM messages WHERE merged_into = ? ORDER BY id",
                (message.id,))]

    def passive_reply(self, openid: str, message_id: int, now: float, hand_out_by: float,
                      fetch: bool = False
                      ) -> tuple[str, tuple[int | None, int] | None, int | None] | None:
        """The segment the reply to this push carries; what follows it, if anything, as the
        继续 line tells it (Store._more); and the picture it is (images.message_id), if it is
        one. None while there is none, or once `hand_out_by` (time.monotonic()) has passed.

        The same push retried gets the same segment; otherwise the next unsent segment of
        this message's own answer (which carries what the user was still owed), or of the
        answer it was merged into. `fetch` (a 继续) also takes the next segment of an earlier
        answer still being written, and is answered by it: the rest needs no waiting for the
        whole. An event never takes another message's answer. Looking costs a read; the one
        write is handing a segment out, and a segment is handed out only while there is time
        for the reply to arrive.
        """
        while True:
            with self.connection() as conn:
                replied = conn.execute(
                    "SELECT message_id, seq, content, image, origin FROM segments"
                    " WHERE replied_to = ?", (message_id,)).fetchone()
                if replied:  # a retry of a push already answered
                    return replied["content"], self._more(conn, openid, replied), \
                        replied["image"]
                waiting = conn.execute(
                    "SELECT message_id, seq, content, image, origin FROM segments"
                    " WHERE message_id = (SELECT coalesce(merged_into, id) FROM messages"
                    " WHERE id = ?) AND sent_at IS NULL AND tried_at IS NULL AND moved_to IS NULL"
                    " AND card IS NULL ORDER BY seq LIMIT 1", (message_id,)).fetchone()
                writing = None if waiting or not fetch else conn.execute(
                    "SELECT s.message_id, s.seq, s.content, s.image, s.origin FROM messages m"
                    " JOIN segments s ON s.message_id = m.id WHERE m.openid = ? AND m.id < ?"
                    " AND m.state IN ('queued', 'leased') AND m.answered_at IS NULL"
                    " AND s.sent_at IS NULL AND s.tried_at IS NULL AND s.moved_to IS NULL"
                    " AND s.card IS NULL ORDER BY m.id, s.seq LIMIT 1",
                    (openid, message_id)).fetchone()
            segment = waiting or writing
            if segment is None:
                return None
            with self.transaction() as conn:
                if time.monotonic() > hand_out_by:
                    return None
                taken = conn.execute(  # never one a worker is sending (tried_at)
                    "UPDATE segments SET sent_at = ?, replied_to = ? WHERE message_id = ?"
                    " AND seq = ? AND sent_at IS NULL AND tried_at IS NULL AND moved_to IS NULL",
                    (now, message_id, segment["message_id"], segment["seq"])).rowcount
                # A 继续 answered from an answer still being written has had its answer: no
                # Sender answers it again. One a Sender has in hand already keeps its own.
                if taken and writing and not conn.execute(
                        "UPDATE messages SET state = 'done', answered_at = ? WHERE id = ?"
                        " AND state = 'queued'", (now, message_id)).rowcount:
                    conn.execute("UPDATE segments SET sent_at = NULL, replied_to = NULL"
                                 " WHERE message_id = ? AND seq = ?",
                                 (segment["message_id"], segment["seq"]))
                    taken = 0
            if taken:  # else another push of the same answer took it first: look again
                with self.connection() as conn:
                    return segment["content"], self._more(conn, openid, segment), \
                        segment["image"]

    @staticmethod
    def _more(conn: sqlite3.Connection, openid: str, segment: sqlite3.Row
              ) -> tuple[int | None, int] | None:
        """What follows a segment handed out, as the 继续 line tells it: (how many segments
        of its answer remain: 0 while that is not known yet, None when its answer is whole
        and what follows is the answer to a later question; the answer the link names), or
        None when nothing follows."""
        carrier = segment["message_id"]
        answer = segment["origin"] or carrier
        rest = conn.execute(
            f"SELECT count(*) FROM segments s WHERE s.message_id = :carrier AND {ANSWER_OF}"
            " = :answer AND s.sent_at IS NULL AND s.moved_to IS NULL AND s.card IS NULL",
            {"carrier": carrier, "answer": answer}).fetchone()[0]
        answering = [waiting["id"] for waiting in conn.execute(
            "SELECT id, msg_type, content FROM messages WHERE openid = ?"
            " AND state IN ('queued', 'leased') AND answered_at IS NULL", (openid,))
            if classify(waiting["msg_type"], waiting["content"], drawing=True).kind
            in (Kind.QUESTION, Kind.DRAW)]
        writing = answer == carrier and carrier in answering  # how much follows: not known
        newest = max(answering) if answering else conn.execute(
            "SELECT max(s.message_id) FROM segments s JOIN messages m ON m.id = s.message_id"
            " WHERE m.openid = ? AND s.sent_at IS NULL AND s.moved_to IS NULL"
            " AND s.card IS NULL",
            (openid,)).fetchone()[0]
        if rest or writing:
            return (0 if writing else rest), newest
        return None if newest is None else (None, newest)

    def continue_id(self, answer_id: int) -> str:
        """The id a 继续 link carries for an answer (msgmenuid, back as <bizmsgmenuid>): digits
        that name the answer to this database alone, where the row id would tell anyone how
        many messages came before and name the answers around it."""
        digest = hmac.digest(self._continue_key, str(answer_id).encode(), "sha256")
        return str(int.from_bytes(digest[:6], "big"))

    def tap_current(self, message: Message, tapped: str) -> bool:
        """Whether a tapped 继续 (<bizmsgmenuid>, any text) belongs to the answer whose rest 继续
        fetches now: the newest with segments unsent (its link may name a message merged into
        it). A tap on an older answer's link is not, nor one on another user's; with nothing
        unsent at all, any tap gets the usual "nothing more"."""
        with self.connection() as conn:
            newest = conn.execute("SELECT max(s.message_id)" + EARLIER_UNSENT,
                                  {"openid": message.openid, "id": message.id}).fetchone()[0]
            named = [row[0] for row in conn.execute(
                "SELECT id FROM messages WHERE openid = ? AND (id = ? OR merged_into = ?)",
                (message.openid, newest, newest))] if newest is not None else []
        return newest is None or tapped in {self.continue_id(answer) for answer in named}

    def reply_at_once(self, message_id: int, text: str, now: float, passive: bool) -> bool:
        """Store a fixed reply as the whole answer of a message no worker has taken; False
        when a worker took it first. Passive: it is this push's reply, sent as it is stored
        (its retries get it again). Otherwise it stays queued, unsent, for a Sender, which
        takes it at once, even while its user's question before it is in hand (CLAIMABLE),
        and sends it as any answer (marked sent, within the message's quota)."""
        with self.transaction() as conn:
            if conn.execute("UPDATE messages SET state = :state, answered_at = :now"
                            " WHERE id = :id AND state = 'queued' AND answered_at IS NULL",
                            {"id": message_id, "now": now,
                             "state": "done" if passive else "queued"}).rowcount != 1:
                return False
            conn.execute("INSERT INTO segments (message_id, seq, content, sent_at, replied_to)"
                         " VALUES (?, 0, ?, ?, ?)", (message_id, text, now if passive else None,
                                                      message_id if passive else None))
        return True

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
        """The message's segments to send, in order; `answer`: the message whose answer each
        is part of (ANSWER_OF)."""
        with self.connection() as conn:
            return conn.execute("SELECT seq, content, image, card, tried_at, sent_at,"
                                f" {ANSWER_OF} AS answer FROM segments s WHERE message_id = ?"
                                " AND moved_to IS NULL ORDER BY seq", (message_id,)).fetchall()

    #: Queued messages read to count the people ahead of one: a queue of thousands costs each
    #: push a bounded read (0.2 ms), not one of the whole queue (4.6 ms at 20,000).
    AHEAD_READ = 1000

    def waiting_ahead(self, message_id: int, openid: str, now: float) -> tuple[int, bool]:
        """The people in the queue before a message: other users with a message queued before
        it that a worker may take now and answer with the model (needs_model: a click that
        asks it too). Not counted: messages held back after a failure (not_before), answers
        already stored (a fixed reply goes out at once), messages a Sender answers (继续,
        /help, the other events), nor the user's own earlier messages (they are answered
        first, quick follow-ups together with them). Read among the AHEAD_READ queued
        messages nearest it (held ones included): (people, whether more are queued before)."""
        with self.connection() as conn:
            people, read = conn.execute(
                "SELECT count(DISTINCT openid) FILTER (WHERE not_before <= :now AND answered_at"
                " IS NULL AND needs_model AND openid != :openid), count(*) FROM (SELECT openid,"
                " not_before, answered_at, needs_model FROM messages WHERE state = 'queued'"
                " AND id < :id ORDER BY id DESC LIMIT :most + 1)",
                {"id": message_id, "now": now, "openid": openid, "most": self.AHEAD_READ}
            ).fetchone()
        return people, read > self.AHEAD_READ

    def queued_at_most(self, message_id: int) -> int:
        """At most how many messages are queued before one: the ids since the oldest queued
        (one step in the index, however long the queue)."""
        with self.connection() as conn:
            oldest = conn.execute("SELECT min(id) FROM messages WHERE state = 'queued'"
                                  ).fetchone()[0]
        return max(0, message_id - oldest) if oldest is not None else 0

    def answer_seconds(self) -> float | None:
        """How long the model took over its last answers (the median of 20, from the call
        to the answer complete); None before the first."""
        with self.connection() as conn:
            took = [row[0] for row in conn.execute(
                "SELECT m.answered_at - c.called_at FROM model_calls c JOIN messages m"
                " ON m.id = c.message_id WHERE m.answered_at IS NOT NULL"
                " ORDER BY c.message_id DESC LIMIT 20")]
        return statistics.median(took) if took else None

    def awaiting_answer(self, since: float) -> list[sqlite3.Row]:
        """Queued messages received since `since` whose answer the model is still to write."""
        with self.connection() as conn:
            return conn.execute("SELECT id, openid, received_at FROM messages"
                                " WHERE received_at >= ? AND state = 'queued' AND needs_model"
                                " AND answered_at IS NULL ORDER BY id", (since,)).fetchall()

    def note_queue_lines(self, message_ids: list[int], now: float) -> list[int]:
        """Note, before it is sent, that the queue line goes out for these messages: it takes
        one of their 5 messages (quota). Those whose answer began to go out get none, nor
        those whose user has a line for an earlier message still waiting for its answer
        (one line per wait: the follow-ups are answered with it, or after it).
        Returns the ids noted now: not those noted before (a message resumed after a restart
        has had its line)."""
        if not message_ids:
            return []
        with self.transaction() as conn:
            noted = []
            for message_id in message_ids:
                if conn.execute("SELECT 1 FROM segments WHERE message_id = ?"
                                " AND tried_at IS NOT NULL LIMIT 1", (message_id,)).fetchone():
                    continue
                if conn.execute(
                        "SELECT 1 FROM messages m JOIN messages o ON o.openid = m.openid"
                        " AND o.state IN ('queued', 'leased') AND o.id < m.id"
                        " AND o.answered_at IS NULL JOIN kv ON kv.key = ? || o.id"
                        " WHERE m.id = ? LIMIT 1",
                        (QUEUE_LINE_KEY.format(""), message_id)).fetchone():
                    continue
                # The quota of a user message lasts 48 h; the note need not outlive it.
                if conn.execute("INSERT OR IGNORE INTO kv (key, value, expires_at)"
                                " VALUES (?, ?, ?)", (QUEUE_LINE_KEY.format(message_id),
                                                      str(now), now + 3 * 86400)).rowcount:
                    noted.append(message_id)
            return noted

    def quota(self, message: Message) -> int:
        """Customer-service messages the answer to a message may use: WeChat's 5 per user
        message, 3 per menu click or follow (45047), less the queue line if one went out and
        the messages sent on the message's quota besides its answer (QUOTA_USED_KEY)."""
        allowed = EVENT_QUOTA if message.msg_type == "event" else QUOTA
        return allowed - (self.get_kv(QUEUE_LINE_KEY.format(message.id), 0) is not None) - \
            int(self.get_kv(QUOTA_USED_KEY.format(message.id), 0) or 0)

    @staticmethod
    def use_quota(conn: sqlite3.Connection, message_id: int, sent: int, now: float) -> None:
        """Count `sent` messages against a message's quota that are not segments of its
        answer (the owner's own, an apology before an answer asked again)."""
        conn.execute("INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT"
                     " (key) DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                     (QUOTA_USED_KEY.format(message_id), str(sent), now + 3 * 86400))

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

    def forget(self, openid: str, before_id: int) -> int:
        """Forget the user's conversation before this message (/reset): the history sent to the
        model, and the texts of their earlier messages, drawing prompts and answers. The message
        rows stay (they count in /stats and keep WeChat's retries from being answered twice), so
        do the drawing rows (they count in WXBOT_IMAGE_DAILY); their answers' segments go.
        Returns the number of turns forgotten."""
        with self.transaction() as conn:
            earlier = ("SELECT id FROM messages WHERE openid = :openid AND id < :id"
                       " AND state NOT IN ('queued', 'leased')")
            params = {"openid": openid, "id": before_id}
            conn.execute(f"DELETE FROM segments WHERE message_id IN ({earlier})", params)
            conn.execute(f"UPDATE messages SET content = NULL, fields = '{{}}' WHERE id IN"
                         f" ({earlier}) AND (content IS NOT NULL OR fields != '{{}}')", params)
            conn.execute(f"UPDATE images SET prompt = '' WHERE message_id IN ({earlier})"
                         " AND prompt != ''", params)
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
                "token_valid_s": round(token[0] - now) if token else None,
                **{f"{counter}_today": self.counted(counter, now)
                   for counter in ("keyword_replies", "click_replies", "blocked")}}

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

    # Drawings ----------------------------------------------------------------

    def reserve_image(self, message: Message, prompt: str, now: float, daily: int,
                      windows: list[tuple[float, int]]) -> tuple[str, float] | None:
        """Count the picture a message asks for, and the model call it is, unless the user's
        WXBOT_IMAGE_DAILY or a call window is full: ("images" or "calls", seconds until a
        place frees) then. None when it may be drawn (asked again after a restart: counted
        once). The user's earlier answer's rest is dropped, as for a question."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM images WHERE message_id = ?",
                            (message.id,)).fetchone():
                return None
            if daily:
                drawn = conn.execute(
                    "SELECT asked_at FROM images WHERE openid = ? AND asked_at > ?"
                    " ORDER BY asked_at DESC LIMIT ?",
                    (message.openid, now - 86400, daily)).fetchall()
                if len(drawn) >= daily:
                    return "images", drawn[-1][0] + 86400 - now
            wait = self.count_model_call(message, now, windows)
            if wait is not None:
                return "calls", wait
            conn.execute("INSERT INTO images (message_id, openid, prompt, asked_at)"
                         " VALUES (?, ?, ?, ?)", (message.id, message.openid, prompt, now))
            self._start_answer(conn, message, True, Leftovers.DROP)
        return None

    def image(self, image_id: int) -> sqlite3.Row | None:
        with self.connection() as conn:
            return conn.execute("SELECT bytes, media_id, uploaded_at FROM images"
                                " WHERE message_id = ?", (image_id,)).fetchone()

    def keep_image(self, message: Message, data: bytes) -> None:
        """The picture as the provider drew it, stored before anything else is done with it."""
        with self.transaction() as conn:
            self._check_lease(conn, message)
            conn.execute("UPDATE images SET bytes = ? WHERE message_id = ?",
                         (data, message.id))

    def keep_media(self, image_id: int, media_id: str, now: float) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE images SET media_id = ?, uploaded_at = ? WHERE message_id = ?",
                         (media_id, now, image_id))

    def image_sent(self, image_id: int) -> None:
        """The picture went out: its bytes are no longer needed (a retry reuses media_id)."""
        with self.transaction() as conn:
            conn.execute("UPDATE images SET bytes = NULL WHERE message_id = ?"
                         " AND bytes IS NOT NULL", (image_id,))

    def unreserve_image(self, message: Message) -> None:
        """Nothing was drawn (refused, failed for good): it does not count as one of the day's."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM images WHERE message_id = ?", (message.id,))

    def add_image(self, message: Message, now: float) -> int:
        """End the message's answer with its picture; the number of segments it has to send."""
        with self.transaction() as conn:
            self._check_lease(conn, message)
            conn.execute("INSERT INTO segments (message_id, seq, content, image) VALUES"
                         " (?, (SELECT coalesce(max(seq) + 1, 0) FROM segments"
                         " WHERE message_id = ?), ?, ?)",
                         (message.id, message.id, IMAGE_SEGMENT, message.id))
            return self._complete_answer(conn, message, now, [], None, None)

    def image_as_text(self, message_id: int, seq: int, line: str) -> None:
        """A picture that cannot be sent becomes a line saying so, sent in its place."""
        with self.transaction() as conn:
            conn.execute("UPDATE segments SET content = ?, image = NULL WHERE message_id = ?"
                         " AND seq = ?", (line, message_id, seq))

    # Retention ---------------------------------------------------------------

    #: Tables of other rooms (the owner's loop, notifications) that hold readers' words and
    #: are kept as long as messages are: (table, its time column); each oldest first by id.
    KEPT_LIKE_MESSAGES = (("owner_messages", "sent_at"), ("notifications", "at"))

    @staticmethod
    def _prune_others(conn: sqlite3.Connection, gone: list[tuple[int]], before: float,
                      now: float, batch: int) -> dict[str, int]:
        """One batch of the other rooms' old rows, in the prune's transaction: a reader's
        words kept while handed to the owner go with their message; the owner's messages and
        the notifications by their time; handoffs that ended."""
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type ="
                                                 " 'table'")}
        removed = collections.Counter()
        if "held_messages" in tables:
            conn.executemany("DELETE FROM held_messages WHERE message_id = ?", gone)
        for table, column in Store.KEPT_LIKE_MESSAGES:
            if table in tables:
                rows = conn.execute(f"SELECT id, {column} FROM {table} ORDER BY id LIMIT ?",
                                    (batch,)).fetchall()
                old = [(row[0],) for row in itertools.takewhile(lambda row: row[1] < before,
                                                                 rows)]
                conn.executemany(f"DELETE FROM {table} WHERE id = ?", old)
                removed[table] += len(old)
        if "handoffs" in tables:
            removed["handoffs"] += conn.execute("DELETE FROM handoffs WHERE until < ?",
                                                (now,)).rowcount
        return removed

    def prune(self, now: float, keep_seconds: float, history_seconds: float,
              after_id: int = 0, batch: int = 500,
              removed: collections.Counter | None = None) -> int | None:
        """Delete one batch of what is older than keep_seconds: finished messages with their
        segments and model calls, turns (those within history_seconds stay: they are still
        sent to the model), expired keys; then give the freed pages back to the filesystem.
        Returns the message id to go on after, or None when nothing old is left; `removed`
        counts the rows deleted, by table.

        A few hundred rows a transaction keep the write lock short, so pushes arriving
        meanwhile wait milliseconds. Rows are walked oldest first by id, never found by a
        scan. The newest message is kept, so that an id is never used twice.
        """
        before = now - keep_seconds
        turns_before = min(before, now - history_seconds)
        with self.write_turn(), self.connection() as conn:
            # Links into deleted history (a segment carried to a later message, a follow-up
            # merged into an earlier one) may point nowhere: nothing reads them any more.
            conn.execute("PRAGMA foreign_keys=OFF")
            try:
                conn.execute("BEGIN IMMEDIATE")
                rows = conn.execute(
                    "SELECT id, received_at, state FROM messages WHERE id > ?"
                    " AND id < (SELECT max(id) FROM messages) ORDER BY id LIMIT ?",
                    (after_id, batch)).fetchall()
                old = list(itertools.takewhile(lambda row: row[1] < before, rows))
                gone = [(row[0],) for row in old if row[2] not in ("queued", "leased")]
                conn.executemany("DELETE FROM segments WHERE message_id = ?", gone)
                conn.executemany("DELETE FROM model_calls WHERE message_id = ?", gone)
                conn.executemany("DELETE FROM images WHERE message_id = ?", gone)
                conn.executemany("DELETE FROM messages WHERE id = ?", gone)
                turns = conn.execute("SELECT id, created_at FROM turns ORDER BY id LIMIT ?",
                                     (batch,)).fetchall()
                old_turns = list(itertools.takewhile(lambda row: row[1] < turns_before, turns))
                conn.executemany("DELETE FROM turns WHERE id = ?",
                                 [(row[0],) for row in old_turns])
                keys = conn.execute("DELETE FROM kv WHERE expires_at < ?", (now,)).rowcount
                others = self._prune_others(conn, gone, before, now, batch)
                conn.execute("COMMIT")
                if removed is not None:
                    removed.update(messages=len(gone), turns=len(old_turns), keys=keys,
                                   **others)
                # sqlite3's execute() steps this once, freeing one page; executescript runs it
                # to the end.
                conn.executescript("PRAGMA incremental_vacuum")
            finally:
                if conn.in_transaction:
                    conn.rollback()
                conn.execute("PRAGMA foreign_keys=ON")
        if len(old) == batch:
            return old[-1][0]
        return after_id if len(old_turns) == batch else None

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database file and cut the WAL to nothing, so that the pages
        a retention pass freed leave the disk in total; returns database_bytes() after.

        Each try holds the write turn (pushes wait for it as for any write) but never waits
        for a reader: one still on an older snapshot (a worker's read, a backup in another
        process) makes the try copy what it can and give up, and the turn goes to the pushes
        before the next try.
        """
        for _ in range(self.CHECKPOINT_TRIES):
            with self.write_turn(), self.connection() as conn:
                conn.execute("PRAGMA busy_timeout=0")
                try:
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                finally:
                    conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            if not busy:
                break
            time.sleep(self.CHECKPOINT_PAUSE)
        else:
            log.info("the WAL was not emptied: the database was being read throughout (a "
                     "backup?); the next retention pass tries again")
        return database_bytes(self.path)

    # Key-value (the access token) -------------------------------------------

    def get_kv(self, key: str, now: float) -> str | None:
        with self.connection() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ? AND (expires_at IS NULL"
                               " OR expires_at > ?)", (key, now)).fetchone()
        return row[0] if row else None

    def set_kv(self, key: str, value: str, expires_at: float | None) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                         (key, value, expires_at))

    def bump(self, counter: str, now: float) -> None:
        """Count one more today, for /stats (fixed replies, blocked questions)."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO kv (key, value, expires_at) VALUES (?, 1, ?)"
                         " ON CONFLICT (key) DO UPDATE SET value = value + 1",
                         (f"count:{counter}:{time.strftime('%Y-%m-%d', time.localtime(now))}",
                          now + 2 * 86400))

    def counted(self, counter: str, now: float) -> int:
        """How many bump() counted today."""
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        return int(self.get_kv(f"count:{counter}:{day}", now) or 0)

    # Health -----------------------------------------------------------------

    def health(self, now: float) -> dict:
        """For /healthz: from the state counts and indexed queries only, however big the file."""
        with self.connection() as conn:
            counts = dict(conn.execute("SELECT state, messages FROM state_counts").fetchall())
            oldest = conn.execute("SELECT min(received_at) FROM messages"
                                  " WHERE state IN ('queued', 'leased')").fetchone()[0]
            unsent = conn.execute("SELECT count(*) FROM segments WHERE sent_at IS NULL"
                                  " AND moved_to IS NULL AND card IS NULL").fetchone()[0]
        return {
            "queued": counts.get("queued", 0) + counts.get("leased", 0),
            "in_progress": counts.get("leased", 0),
            "oldest_queued_age_s": round(now - oldest, 3) if oldest else 0,
            "answered": counts.get("done", 0),
            "failed": counts.get("failed", 0),
            "dead": counts.get("dead", 0),
            "unsent_segments": unsent,
        }


def requeue(conn: sqlite3.Connection, message_id: int, now: float) -> str | None:
    """Ask a message again, its failure counts cleared (the `retry` command, the console's
    retry button), in the caller's transaction: a dead one, or one that failed and got the
    apology, whose segments go (the apology stays counted in its 5 messages: QUOTA_USED_KEY)
    so that the model is asked anew. None when it is queued; else the state it is in, which
    leaves nothing to do ("" when there is no such message)."""
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return ""
    if row[0] not in (State.DEAD.value, State.FAILED.value):
        return row[0]
    if row[0] == State.FAILED.value:
        sent = conn.execute("SELECT count(*) FROM segments WHERE message_id = ? AND sent_at"
                            " IS NOT NULL", (message_id,)).fetchone()[0]
        if sent:
            Store.use_quota(conn, message_id, sent, now)
        conn.execute("DELETE FROM segments WHERE message_id = ?", (message_id,))
        conn.execute("UPDATE messages SET answered_at = NULL WHERE id = ?", (message_id,))
    conn.execute("UPDATE messages SET state = 'queued', not_before = 0, lease_until = NULL,"
                 " model_failures = 0, delivery_failures = 0, interruptions = 0,"
                 " error = NULL WHERE id = ?", (message_id,))
    return None


###############################################################################
# Articles: the account's own writing #########################################
###############################################################################

@dataclasses.dataclass(frozen=True)
class Passage:
    """A piece of an article that may answer a question, with what names its article."""

    source_id: int
    title: str          # the article's title (or file name when it has none)
    url: str            # "" for a file with no URL
    date: str           # "YYYY-MM-DD" or ""
    text: str           # a few hundred characters cut at paragraph/sentence ends


@dataclasses.dataclass(frozen=True)
class Source:
    """One learned article, page or file."""

    id: int
    kind: str           # "published" | "url" | "file" | "note" (the owner's, NOTE_URL)
    origin: str         # article_id / URL / absolute path: what identifies it when learned again
    title: str
    url: str
    date: str
    passages: int
    learned_at: float
    #: Learned before from the same text: left as it was, nothing written.
    unchanged: bool = False


@dataclasses.dataclass(frozen=True)
class Card:
    """An article as a card of its own (WECHAT.md §9), one of the quota's messages."""

    source_id: int
    message: dict       # what custom/send takes besides touser
    line: str           # the 来源 line naming the article: sent instead if the card is refused


#: A card's description, at most (WeChat shows two lines of it).
SUMMARY_CHARS = 120
#: What a learned source can be; a note is the owner's answer written in the console.
SOURCE_KINDS = ("published", "url", "file", "note")
#: The url of an owner's note: no page, and the 来源 line names it NOTE_SOURCE, unlinked.
NOTE_URL = "note:"
NOTE_SOURCE = "公众号说明"


class LearnError(Exception):
    """A source could not be learned; the message says why, for the owner."""


ARTICLES_SCHEMA = """
CREATE TABLE IF NOT EXISTS article_sources (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('published', 'url', 'file', 'note')),
    origin     TEXT NOT NULL UNIQUE,
    title      TEXT NOT NULL,
    url        TEXT NOT NULL DEFAULT '',
    date       TEXT NOT NULL DEFAULT '',
    passages   INTEGER NOT NULL,
    digest     TEXT NOT NULL,  -- of title and text: a sync skips what did not change
    learned_at REAL NOT NULL,
    -- What its card shows (Articles.card): a published article's digest or a page's
    -- og:description, and its picture (thumb_url, og:image); '' when it had none.
    summary    TEXT NOT NULL DEFAULT '',
    cover      TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS article_passages (
    id        INTEGER PRIMARY KEY,  -- the rowid of its terms in article_terms
    source_id INTEGER NOT NULL REFERENCES article_sources (id) ON DELETE CASCADE,
    text      TEXT NOT NULL,
    -- Its Latin words and numbers as latin_terms() finds them, space-separated: a question
    -- of V60 or CT weighs a hundred candidates without folding each (NULL: learned before).
    latin     TEXT
);
CREATE INDEX IF NOT EXISTS article_passages_source ON article_passages (source_id);
-- The words of each passage and of its article's title as article_terms() spells them:
-- characters and pairs of characters, so that a two-character word (退款) matches, which
-- FTS5's trigram tokenizer cannot. Contentless (the text is in article_passages) and without
-- positions (a pair is its own term, no phrase query is needed): the index stays small.
CREATE VIRTUAL TABLE IF NOT EXISTS article_terms USING fts5 (
    title, body, content='', detail='column', tokenize='unicode61 remove_diacritics 0');
CREATE VIRTUAL TABLE IF NOT EXISTS article_vocabulary USING fts5vocab (article_terms, 'row');
-- Each passage's meaning as the embeddings model (WXBOT_EMBED_MODEL) gives it: the vector
-- scaled to signed bytes (meaning_bytes()), for find() to compare the question's with.
CREATE TABLE IF NOT EXISTS article_vectors (
    passage_id INTEGER PRIMARY KEY REFERENCES article_passages (id) ON DELETE CASCADE,
    model      TEXT NOT NULL,
    vector     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS article_uses (
    message_id INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    given      INTEGER NOT NULL,
    cited      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS article_uses_at ON article_uses (at);
-- The console's questions no article covered.
CREATE INDEX IF NOT EXISTS article_uses_uncovered ON article_uses (at) WHERE given = 0;
CREATE TABLE IF NOT EXISTS article_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
#: Bumped when article_terms() spells terms differently: the index is then built again,
#: since a contentless index can only delete a passage's terms spelled as they were added.
TERMS_VERSION = 2

#: Chinese, Japanese kana and Korean letters: a character of these is a word of its own.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
#: A run of CJK characters, or a Latin word or number (V60, 39, 4.5): linear, no overlap.
_TERM_RUNS = re.compile(rf"([{_CJK}]+)|([0-9]+\.[0-9]+|[a-z0-9]+)")
#: Characters that carry no meaning of their own in a question (particles, pronouns).
QUESTION_FILLER = frozenset("的了吗呢吧啊呀哦嘛么是在和与或就都也还又很太我你他她它们这那哪个些请问想"
                            "怎样什为把被给让从对到于之其及而哈嗯噢喔哎诶呗咋啥吶可以能会要有没不几")
#: Characters that join words rather than make them (当天的气氛: 天的气 is no 天气).
BETWEEN_WORDS = "的了是和与及或也都着过吗呢吧啊之"


#: Words that ask rather than say: the answer holds a number or a name in their place.
QUESTION_WORDS = re.compile("多少钱|几块钱|多少|几点|多久|多长时间|怎么样|怎么|什么|哪里|哪儿|哪些|哪个|为什么|"
                            "是不是|有没有|能不能|可不可以|请问|一下")


def _word(word: str) -> str:
    """A Latin word or number as it is indexed: a number without leading zeros, its decimal
    point a letter (the tokenizer splits at a point)."""
    if word.isdigit() or "." in word:
        word = (word.lstrip("0") or "0").replace(".", "p")
    return word


_LETTERS_DIGITS = re.compile(r"[a-z]+|[0-9]+")


def _word_parts(word: str) -> tuple[str, ...]:
    """A Latin word or number as indexed: itself, and for letters and digits together (V60)
    each run of either, so that "v 60" finds it."""
    # The short ones are kept: the same words and numbers come back in passage after
    # passage, and a search splits those of a hundred candidates.
    return _short_word_parts(word) if len(word) <= 32 else _split_word(word)


def _split_word(word: str) -> tuple[str, ...]:
    parts = _LETTERS_DIGITS.findall(word) if "." not in word else []
    return (_word(word), *map(_word, parts)) if len(parts) > 1 else (_word(word),)


_short_word_parts = functools.lru_cache(maxsize=4096)(_split_word)


#: A price written with the sign before it (¥39, ￥39 folds to ¥39), as 39元 says it.
_PRICE_SIGN = re.compile(r"¥ ?([0-9]+(?:\.[0-9]+)?)")


#: Full-width Latin letters, digits and punctuation (，：（）) as NFKC spells them: Chinese
#: text is full of them, and mapping them first leaves NFKC nothing to do (a quick check).
_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


#: Radicals and compatibility ideographs: text copied out of a PDF writes 用水人 as ⽤⽔⼈.
_CJK_VARIANTS = re.compile("[\u2e80-\u2fdf\uf900-\ufaff\U0002f800-\U0002fa1f]+")


def unified_cjk(text: str) -> str:
    """The text with its radicals and compatibility ideographs as the characters they stand
    for (NFKC's, as fold() indexes them), the rest as written: a passage reads, and is
    weighed, as it is searched."""
    return _CJK_VARIANTS.sub(lambda found: unicodedata.normalize("NFKC", found.group()), text)


def priced(text: str) -> str:
    """The text with a price's sign read as fold() reads it (¥39, ￥39 as 39元), the rest as
    written: what a passage's CJK terms are matched in."""
    if "¥" in text or "￥" in text:  # ￥３８ as fold() reads it: the width folded first
        text = _PRICE_SIGN.sub(r"\1元", text.translate(_FULL_WIDTH).replace("￥", "¥"))
    return text


def fold(text: str) -> str:
    """Text as it is indexed and searched (NFKC: full-width folded), lower case, ¥39 as 39元."""
    text = text.translate(_FULL_WIDTH)
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return _PRICE_SIGN.sub(r"\1元", text.lower())


#: Two Latin words joined by a hyphen, from the first's beginning (linear: one try a word).
_HYPHENATED = re.compile(r"(?<![a-z0-9])([a-z0-9]+)-(?=([a-z0-9]+))")


def hyphen_pairs(folded: str) -> list[tuple[str, str]]:
    """The words a hyphen joins (wi, fi in Wi-Fi), each two neighbours of a chain; not numbers
    alone (a date, a telephone number)."""
    return [(first, second) for first, second in _HYPHENATED.findall(folded)
            if not (first + second).isdigit()]


def hyphen_joined(folded: str) -> list[str]:
    """Words written with a hyphen as readers type them without (Wi-Fi: wifi, e-mail)."""
    return [first + second for first, second in hyphen_pairs(folded)]


def article_terms(text: str) -> list[str]:
    """The terms a text is indexed by: each CJK character and each pair of neighbours, each
    Latin word and number (folded: full-width, case, leading zeros), a number with the
    character after it (39元, 8月), and words joined by a hyphen as one (wifi for Wi-Fi)."""
    folded = fold(text)
    terms: list[str] = hyphen_joined(folded)
    last_end, last_number = -1, ""
    for match in _TERM_RUNS.finditer(folded):
        run, word = match.group(1), match.group(2)
        if run:
            terms.extend(run)
            terms.extend(run[i:i + 2] for i in range(len(run) - 1))
            if last_number and match.start() == last_end:
                terms.append(last_number + run[0])
            last_number = ""
        else:
            parts = _word_parts(word)
            last_number = parts[0] if parts[0][0].isdigit() else ""
            terms.extend(parts)
        last_end = match.end()
    return terms


#: How Chinese says a question goes on from the one before (那我呢, 三个人呢, 还要…吗).
GOES_ON = re.compile(r"^(那|还|另外)|呢[？?。!！～~…]*$")


#: How Chinese asks for a place, a price, a length of time and a phone number, and how
#: any account's articles answer: a question holding one of these words finds a passage
#: holding any other of its group (在哪 finds 地址, 多少钱 finds 费用). Words of the language,
#: not of one kind of account: what readers call a thing otherwise (牙医 for 口腔科) is found
#: by meaning (WXBOT_EMBED_MODEL) or by the search words the model writes (search_words()).
ASKING_WORDS = (
    ("在哪", "在哪里", "在哪儿", "地址", "位置", "怎么走", "怎么去", "怎么到"),
    ("多少钱", "几块钱", "多钱", "价格", "价钱", "收费", "费用", "便宜", "贵", "元"),
    ("多久", "多长时间", "几天", "几分钟", "分钟", "小时", "时间"),
    ("电话", "联系方式", "手机号"),
)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One thing a question asks about, and what shows it in a passage."""

    strong: tuple[frozenset[str], ...]  # a passage showing all terms of one: it is there
    weak: frozenset[str] = frozenset()  # showing one of these: it may be (a character alone)


def alternating(messages: list[dict]) -> list[dict]:
    """The turns with each run of one role's text made one turn: a reader's messages kept
    while the owner answered, or the owner's several answers, follow each other, and many
    providers refuse a conversation whose roles do not alternate (HTTP 400)."""
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] and \
                isinstance(merged[-1]["content"], str) and isinstance(message["content"], str):
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n"
                                                  f"{message['content']}"}
        else:
            merged.append(message)
    return merged


def _asking_word_pattern() -> re.Pattern:
    # A word of one character asks nothing by itself (元旦, 贵宾): it is only looked for in
    # the passages.
    words = sorted({word for group in ASKING_WORDS for word in group if len(word) > 1},
                   key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words)))


_ASKING_WORD = _asking_word_pattern()
_ASKING_GROUP = {word: group for group in ASKING_WORDS for word in group}


def _shown_by(word: str) -> frozenset[str]:
    """The terms that show a word in a passage: its pairs (a one-character word: itself)."""
    terms = article_terms(word)
    pairs = frozenset(term for term in terms if len(term) > 1 or len(terms) == 1)
    return pairs or frozenset(terms)


def question_units(text: str) -> dict[str, Unit]:
    """What a question asks about, unit by unit: each meaningful CJK character and each Latin
    word or number, with the terms that show the unit in the question's own context (the
    character paired with a neighbour), and each asking word (ASKING_WORDS) with the words
    of its group. A character found alone in a passage is weak evidence; found in one of its
    pairs, strong. Pairs that span two words (周末几点 gives 末几) need not exist anywhere:
    they simply show nothing."""
    folded = fold(text)
    units: dict[str, Unit] = {}
    for found in _ASKING_WORD.finditer(folded):
        group = _ASKING_GROUP[found.group()]
        units[group[0]] = Unit(tuple(_shown_by(word) for word in group))
    folded = QUESTION_WORDS.sub(" ", _ASKING_WORD.sub(" ", folded))
    last_end, last_number = -1, ""
    for match in _TERM_RUNS.finditer(folded):
        run, word = match.group(1), match.group(2)
        if word:
            parts = _word_parts(word)
            last_number = parts[0] if parts[0][0].isdigit() else ""
            for part in parts:
                # A number of one or two digits is a weak sign on its own (16 is in many a
                # price), a strong one with its unit (16元, 8寸, 5公里): see below.
                units.setdefault(part, Unit((frozenset([part]),)) if not part.isdigit() or
                                 len(part) > 2 else Unit((), frozenset([part])))
            last_end = match.end()
            continue
        if last_number and match.start() == last_end and run[0] not in QUESTION_FILLER:
            known = units[last_number]
            units[last_number] = Unit((*known.strong, frozenset([last_number + run[0]])),
                                      known.weak)
        last_number = ""
        for i, char in enumerate(run):
            if char in QUESTION_FILLER:
                continue
            pairs = {run[j:j + 2] for j in (i - 1, i) if j >= 0 and j + 2 <= len(run)}
            if len(run) == 1:
                pairs.add(char)  # a word of one character: found alone is found
            known = units.get(char)
            strong = {*(known.strong if known else ()), *(frozenset([pair]) for pair in pairs)}
            units[char] = Unit(tuple(strong), frozenset([char]))
    # Wi-Fi is one word, written WiFi or Wi-Fi alike (article_terms() joins it too).
    for first, second in hyphen_pairs(folded):
        if first == second or first not in units or second not in units:
            continue  # bye-bye: a word said twice, no other
        del units[first], units[second]
        units[first + second] = Unit((frozenset([first + second]), frozenset([first, second])))
    return units


#: A passage is cut at the end of a paragraph or sentence once it has this many characters;
#: a longer paragraph is cut at its sentence ends. (Measured on accounts' articles: passages
#: of 260 characters split an answer from what it answers as often as they held it.)
PASSAGE_CHARS = 500
PASSAGE_MAX = 1000
_SENTENCE_END = re.compile(r"[。！？!?；;…]")


def sentences(paragraph: str) -> Iterator[str]:
    """A paragraph's sentences, each with its end mark, found one at a time: a split of a
    5 MB paragraph at once would hold the interpreter (and the webhook) for a quarter second."""
    at = 0
    for end in _SENTENCE_END.finditer(paragraph):
        yield paragraph[at:end.end()]
        at = end.end()
    yield paragraph[at:]


#: A line that heads what follows it, and its level: a Markdown heading (## 价格), 「三、价格」,
#: 「（二）报名」, 「1. 费用」, a bold line (**价格**), 【价格】, and a question of a Q&A
#: (Q：… / 问：…), which heads its answer. Short, and not a sentence of its own.
_HEADINGS = (
    (re.compile(r"(#{1,6})[ \t]+\S"), None),
    (re.compile(r"[一二三四五六七八九十]{1,3}[、.．]"), 2),
    (re.compile(r"[（(][一二三四五六七八九十]{1,3}[)）]"), 3),
    (re.compile(r"(?:\*\*|__)[^*_]{1,40}(?:\*\*|__)[:：]?$|【[^】]{1,40}】$"), 3),
    (re.compile(r"[0-9]{1,2}[、.．](?![0-9])"), 4),
    (re.compile(r"(?:Q|q|问)[0-9]{0,2}[:：.．、]"), 5),
)
HEADING_CHARS = 40
#: The characters of a question (and of the one before it) that are searched.
QUESTION_SEARCHED = 300
#: A title at the most, as WeChat's own (a page's <title> may be any length).
TITLE_CHARS = 64
#: What a passage carries of the headings above it, at the most.
SECTION_CHARS = 64


def heading_level(line: str) -> int | None:
    """How deep a line heads the text below it (1 the highest), or None: no heading."""
    if len(line) > HEADING_CHARS and not line[:1] in "Qq问":
        return None
    for pattern, level in _HEADINGS:
        match = pattern.match(line)
        if match:
            if level is None:  # Markdown: by its number of #
                return len(match.group(1))
            if level == 5 and len(line) > 120:
                return None
            # A numbered sentence is an item of a list, not a heading (1. 带上身份证。).
            return None if level in (2, 4) and line.endswith(("。", "；", ";")) else level
    return None


def passages_of(text: str) -> list[str]:
    """The text cut into passages of about PASSAGE_CHARS, at paragraph and sentence ends; a
    passage that starts inside a section begins with that section's headings (「二、收费标准
    · （二）挂号」), so that it is found, and read, as what it is."""
    pieces: list[tuple[str, str]] = []  # (the headings over it, a paragraph or part of one)
    headings: dict[int, str] = {}
    for paragraph in (line.strip() for line in text.splitlines()):
        if not paragraph:
            continue
        level = heading_level(paragraph)
        if level is not None:
            headings = {deeper: line for deeper, line in headings.items() if deeper < level}
            headings[level] = paragraph[:HEADING_CHARS]
        over = " · ".join(headings[key] for key in sorted(headings))[-SECTION_CHARS:]
        if len(paragraph) <= PASSAGE_MAX:
            pieces.append((over, paragraph))
            continue
        sentence = ""
        for part in sentences(paragraph):
            if sentence and len(sentence) + len(part) > PASSAGE_CHARS:
                pieces.append((over, sentence))
                sentence = ""
            sentence += part
            if len(sentence) > PASSAGE_MAX:  # a run with no sentence end at all
                cut = (len(sentence) - 1) // PASSAGE_MAX * PASSAGE_MAX
                pieces.extend((over, sentence[at:at + PASSAGE_MAX])
                              for at in range(0, cut, PASSAGE_MAX))
                sentence = sentence[cut:]
        if sentence:
            pieces.append((over, sentence))
    passages: list[str] = []
    current = ""
    for over, piece in pieces:
        if current and len(current) + len(piece) > PASSAGE_CHARS:
            passages.append(current)
            current = ""
        if not current:
            # Its headings go first (a passage that starts with a heading: those above it).
            heading = heading_level(piece) is not None
            above = over.rsplit(" · ", 1)[0] if heading and " · " in over else \
                "" if heading else over
            current = f"{above}\n{piece}" if above else piece
        else:
            current = f"{current}\n{piece}"
    if current:
        passages.append(current)
    return passages


#: The kinds of file `learn` reads; a folder is searched for these, recursively.
ARTICLE_FILES = (".md", ".markdown", ".txt", ".html", ".htm")


def article_files(folder: str) -> Iterator[str]:
    """The files `learn FOLDER` reads, in name order; hidden files and folders skipped."""
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in ARTICLE_FILES:
                yield os.path.join(root, name)


_MARKDOWN_HEADING = re.compile(r"#{1,6}[ \t]+")
#: A Markdown file's front matter (---, key: value lines, ---), as static site generators write.
_FRONT_MATTER = re.compile(r"---[ \t]*\n((?:[^\n]*\n){0,40}?)---[ \t]*(?:\n|$)")
_FRONT_FIELD = re.compile(r"""(title|date)[ \t]*:[ \t]*["']?([^"'\n]*)""", re.I)
#: A date as articles write it: 2025年4月25日, 2025-04-25, 2025/4/25, 2025.4.25.
_DATE = re.compile(r"(20[0-9]{2}|19[0-9]{2})(?:年|[-/.])([01]?[0-9])(?:月|[-/.])([0-3]?[0-9])日?")
#: A line that only dates the article: the date, with at most a word or two around it
#: (发布于 2025年4月25日, 2025-04-25 小麦与豆): not a sentence that names a date.
_DATE_LINE = re.compile(rf"(?:[^\d\n。，,]{{0,8}}[:： ]?)?\s*{_DATE.pattern}\s*[^\d\n。，,]{{0,12}}")


def found_date(text: str) -> str:
    """The first date in a text as YYYY-MM-DD, or "" (none, or no such day)."""
    match = _DATE.search(text)
    if not match:
        return ""
    try:
        return datetime.date(*(int(part) for part in match.groups())).isoformat()
    except ValueError:
        return ""


#: Characters at each end of a text where text_date() looks for the line that dates it.
DATE_LOOK = 4096


def text_date(text: str) -> str:
    """The article's date as a line of its own says it, among its first and last few lines
    (「2025年4月25日」 under the title, 「发布于 2025-04-25」 at the end), or ""."""
    # Its ends only: a page's 5 MB of text split whole would hold the interpreter.
    head = [line.strip() for line in text[:DATE_LOOK].splitlines() if line.strip()][:5]
    tail = text[-DATE_LOOK:].splitlines()
    if len(text) > DATE_LOOK:
        tail = tail[1:]  # the first line of the tail may be the end of a longer one
    tail = [line.strip() for line in tail if line.strip()][-3:]
    today = china_date(time.time())
    for line in head + tail:
        if len(line) <= 40 and _DATE_LINE.fullmatch(line):
            date = found_date(line)
            # A date to come is an event's (活动时间：2027年1月1日), not the article's.
            if date and date <= today:
                return date
    return ""


def markdown_text(content: str) -> tuple[str, str, str]:
    """A Markdown or plain-text file's title (its front matter's, or its first heading), text
    and date (its front matter's, or a line that dates it; "" if none). Headings stay in the
    text as written: passages_of() knows them."""
    title, date = "", ""
    front = _FRONT_MATTER.match(content)
    if front:
        fields = {key.lower(): value.strip() for key, value in
                  _FRONT_FIELD.findall(front.group(1))}
        title, date = fields.get("title", ""), found_date(fields.get("date", ""))
        content = content[front.end():]
    for line in content.splitlines():
        heading = _MARKDOWN_HEADING.match(line)
        if heading:
            title = title or line[heading.end():].strip().rstrip("#").strip()
            break
    return title, content, date or text_date(content)


@dataclasses.dataclass(frozen=True)
class Page:
    """A fetched web page: where it ended up (after redirects) and its HTML as text."""

    url: str
    html: str


#: Sent with every page fetched: some sites refuse a client that does not name itself.
USER_AGENT = (f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              f"Chrome/124.0 Safari/537.36 wxbot/{__version__}")
#: A page larger than this is not an article.
PAGE_BYTES = 5 * 1024 * 1024


#: Redirects followed to reach a page, as a browser would (it follows 20).
PAGE_REDIRECTS = 5


def private_address(address: str) -> bool:
    """Whether an IP address is this machine's or a private network's (loopback, 10/8,
    192.168/16, 169.254/16, fc00::/7, an IPv4 address mapped in IPv6...)."""
    return not ipaddress.ip_address(address).is_global


class _Late(Exception):
    """The fetch's deadline passed."""


def _address(url: str, private: bool) -> tuple[urllib.parse.SplitResult, str]:
    """The URL's parts and the address to connect to: its host resolved once, every address
    checked. LearnError for what is not an http(s) page readers can open, what two parsers
    read as different hosts (one checked, the other connected to), a name that does not
    resolve, and, unless `private`, any address on this machine or a private network (a
    cloud's 169.254.169.254 answers with its credentials)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LearnError("it leads to a link that is not an http(s) page")
    if parts.password is not None:
        # It would be logged, listed and linked in the 来源 line that readers see.
        raise LearnError("the URL holds a password (user:password@): learn a page readers "
                         "can open without one")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        other = (urllib3.util.parse_url(url).host or "").strip("[]").lower()
    except (ValueError, urllib3.exceptions.LocationParseError):
        other, port = None, 0
    if other != parts.hostname or not _HOST.fullmatch(parts.hostname):
        raise LearnError(f"its address ({parts.netloc[:80]!r}) is read differently by "
                         f"different programs: not fetched")
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise LearnError(f"{parts.hostname} is not found (DNS)") from None
    addresses = [info[4][0].split("%")[0] for info in found]
    if not private and any(map(private_address, addresses)):
        raise LearnError(f"{parts.hostname} is on this machine or a private network: not "
                         f"fetched (WXBOT_LEARN_PRIVATE=1 allows it)")
    return parts, addresses[0]


#: A host name or address as every parser reads it alike.
_HOST = re.compile(r"[a-z0-9._-]+|[0-9a-f:.]+")


def _get(parts: urllib.parse.SplitResult, address: str, deadline: float, close_at: list
         ) -> urllib3.BaseHTTPResponse:
    """GET the page at the address that was checked (with its name for the Host header and
    the certificate); `close_at` gets the connection, which is shut at the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Late()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https":
        conn = urllib3.connection.HTTPSConnection(
            address, port, timeout=remaining, server_hostname=parts.hostname,
            assert_hostname=parts.hostname, cert_reqs="CERT_REQUIRED",
            ca_certs=requests.certs.where())
    else:
        conn = urllib3.connection.HTTPConnection(address, port, timeout=remaining)
    close_at.append(conn)
    target = requests.utils.requote_uri(
        (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    conn.request("GET", target, preload_content=False, decode_content=True, headers={
        "Host": parts.netloc.rpartition("@")[2], "User-Agent": USER_AGENT,
        "Accept": "text/html,application/xhtml+xml", "Accept-Language": "zh-CN,zh;q=0.9",
        "Accept-Encoding": "gzip, deflate", "Connection": "close"})
    return conn.getresponse()


def _shut(conn: urllib3.connection.HTTPConnection) -> None:
    """End a connection another thread waits on (closing it would not wake that thread)."""
    with contextlib.suppress(OSError, AttributeError):
        conn.sock.shutdown(socket.SHUT_RDWR)


def fetch_page(url: str, timeout: float = 20.0, private: bool = False) -> Page:
    """GET a page as a browser would (one at a time: `learn` fetches in turn), all of it,
    redirects and headers included, within `timeout`. Each hop's host is resolved once and
    checked (_address), and that address is the one connected to: a name that resolves
    elsewhere the second time reaches nothing. A redirect is followed as a browser would
    (PAGE_REDIRECTS); LearnError says why the page could not be had."""
    deadline = time.monotonic() + timeout
    connections: list = []
    # A header a byte at a time, each within the read timeout, would never end: at the
    # deadline the connection is shut, whatever it waits for.
    watchdog = threading.Timer(timeout, lambda: [_shut(conn) for conn in connections])
    watchdog.daemon = True
    watchdog.start()
    try:
        for _ in range(PAGE_REDIRECTS + 1):
            parts, address = _address(url, private)
            response = _get(parts, address, deadline, connections)
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or location is None:
                break
            response.release_conn()
            url = urllib.parse.urljoin(url, location)
        else:
            raise LearnError(f"more than {PAGE_REDIRECTS} redirects")
        if response.status != 200:
            raise LearnError(f"the server answered HTTP {response.status}")
        kind = response.headers.get("Content-Type", "text/html")
        if "html" not in kind and "text" not in kind:
            raise LearnError(f"not a web page ({kind.split(';')[0]})")
        # Read as it comes, decompressed a bounded step at a time: a small gzip may unpack
        # to gigabytes.
        chunks, size = [], 0
        while size <= PAGE_BYTES:
            if time.monotonic() > deadline:
                raise _Late()
            chunk = response.read1(PAGE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        body = b"".join(chunks)
        if len(body) > PAGE_BYTES:
            raise LearnError(f"the page is larger than {PAGE_BYTES // 1024 // 1024} MB")
    except (ssl.SSLError, urllib3.exceptions.SSLError, ssl.CertificateError):
        raise LearnError("its HTTPS certificate is not valid") from None
    except (_Late, OSError, http.client.HTTPException, urllib3.exceptions.HTTPError):
        if time.monotonic() >= deadline - 0.05:
            raise LearnError(f"the page did not arrive within {timeout:.0f} s") from None
        raise LearnError("cannot connect to its server") from None
    finally:
        watchdog.cancel()
        for conn in connections:
            conn.close()
    declared = re.search(r"charset=[\"']?([\w-]{1,20})", kind, re.I)
    found = declared or re.search(rb"<meta[^>]{0,200}?charset=[\"']?([\w-]{1,20})",
                                  body[:4096], re.I)
    charset = found.group(1) if found else "utf-8"
    charset = charset if isinstance(charset, str) else charset.decode("ascii")
    try:
        return Page(url, body.decode(charset, errors="replace"))
    except LookupError:
        return Page(url, body.decode("utf-8", errors="replace"))


#: Elements whose content is no text of the article.
_HIDDEN = {"script", "style", "noscript", "template", "svg", "iframe", "head", "nav", "aside",
           "footer", "form", "button", "select", "textarea", "object", "canvas"}
#: Elements that end a line: paragraphs, list items, headings, table rows, breaks.
_BLOCKS = {"p", "div", "section", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
           "blockquote", "article", "main", "header", "ul", "ol", "table", "pre", "hr", "dd",
           "dt", "figcaption", "td", "th"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
         "source", "track", "wbr"}
#: Where an article's text is, most telling first: a 公众号 article's body, then any page's.
_TEXT_REGIONS = ("js_content", "article", "main", "body")
#: Tags read of a page (start and end): an article has a few thousand; a hostile page of a
#: million would hold the interpreter for seconds, so the rest of it is not read.
PAGE_TAGS = 150_000


class _EnoughRead(Exception):
    """PAGE_TAGS were read: the page's text is what came before."""


#: A run of white space (pages' text, blocked words), and a run of anything else.
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"\S+")
#: A "<" that no ">" closes before the next "<": no markup, only text. The standard
#: library's parser looks for the end of each such "<" through the rest of the page (a page
#: of "</</</..." takes quadratic time); as text, it is passed over once. Linear: each
#: look stops at the next "<" or ">". It is read as _LT and handed back as "<" (an "&lt;"
#: each would cost the parser a call per entity).
_STRAY_LT = re.compile(r"<(?=[^<>]*(?:<|\Z))")
#: What a stray "<" is while the page is read (a NUL in a page is U+FFFD, as in a browser).
_LT = "\x00"


class _PageReader(html.parser.HTMLParser):
    """Collects a page's title, its date when it says one, and the text of each region."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title, self.og_title, self.h1_title = "", "", ""
        self.meta: dict[str, str] = {}
        self.published = ""
        self.regions: dict[str, list[str]] = {name: [] for name in _TEXT_REGIONS}
        self._open: list[tuple[str, str | None]] = []  # (tag, the region it opened)
        # How many of each tag and region are open: a hostile page nests thousands of
        # elements, and looking through them at each tag would take quadratic time.
        self._open_tags: collections.Counter = collections.Counter()
        self._open_regions: collections.Counter = collections.Counter()
        self._hidden = 0
        self._in_title = self._in_h1 = self._in_time = False
        self.shown_time = ""
        self._tags = 0

    def _count_tag(self) -> None:
        self._tags += 1
        if self._tags > PAGE_TAGS:
            raise _EnoughRead()

    def handle_starttag(self, tag, attrs):
        self._count_tag()
        attrs = dict(attrs)
        if tag == "meta":
            name = (attrs.get("property") or attrs.get("name") or "").lower()
            if name == "og:title":
                self.og_title = attrs.get("content") or ""
            elif name in ("og:image", "og:description"):  # its card's (Articles.card)
                self.meta[name[3:]] = attrs.get("content") or ""
            elif name in ("article:published_time", "og:article:published_time"):
                self.published = (attrs.get("content") or "")[:10]
            return
        if tag in _VOID:
            if tag in _BLOCKS:
                self._text("\n")
            return
        region = ("js_content" if attrs.get("id") == "js_content" else
                  tag if tag in ("article", "main", "body") else None)
        self._open.append((tag, region))
        self._open_tags[tag] += 1
        self._open_regions[region] += 1
        self._hidden += tag in _HIDDEN
        if tag == "title":
            self._in_title = True
        elif tag == "h1" and attrs.get("id") == "activity-name":
            self._in_h1 = True
        self._in_time = attrs.get("id") == "publish_time" or self._in_time
        if tag in _BLOCKS:
            self._text("\n")

    def handle_endtag(self, tag):
        self._count_tag()
        if tag in _VOID or not self._open_tags[tag]:
            return  # a stray end tag
        while self._open:
            name, region = self._open.pop()
            self._open_tags[name] -= 1
            self._open_regions[region] -= 1
            self._hidden -= name in _HIDDEN
            if name == "title":
                self._in_title = False
            elif name == "h1":
                self._in_h1 = False
            self._in_time = False
            if name == tag:
                break
        if tag in _BLOCKS:
            self._text("\n")

    def handle_data(self, data):
        data = data.replace(_LT, "<")
        if self._in_title and len(self.title) < TITLE_CHARS:
            self.title += data
        if self._in_h1 and len(self.h1_title) < TITLE_CHARS:
            self.h1_title += data
        if self._in_time and len(self.shown_time) < 40:  # <em id="publish_time">2025-04-25
            self.shown_time += data
        if not self._hidden:  # a line break in the source is a space; blocks end lines
            self._text(_SPACES.sub(" ", data))

    def _text(self, data: str) -> None:
        # Text in no region is the body's: a fragment of a page (a published article's
        # content) has no <body>.
        regions = [region for region in _TEXT_REGIONS if self._open_regions[region]]
        for region in regions or ["body"]:
            self.regions[region].append(data)


#: Characters of a page handled at a time. C code holds the interpreter while it runs (a
#: pattern over 5 MB for a tenth of a second): in steps, the webhook's threads run between.
PAGE_STEP = 32 * 1024


def page_steps(page: str) -> Iterator[str]:
    """The page in pieces of PAGE_STEP characters or more, each cut just before a "<": a
    piece's end is then where _STRAY_LT would find the next "<"."""
    at = 0
    while at < len(page):
        cut = page.find("<", at + PAGE_STEP)
        cut = len(page) if cut < 0 else cut
        yield page[at:cut]
        at = cut


def without_comments(page: str) -> str:
    """The page without its comments; one left open hides the rest, as in a browser. Each
    comment's end is looked for once, from its start: a pattern would look for it from every
    "<!--" of a page of unclosed ones, to the end each time (quadratic)."""
    kept, at = [], 0
    while (opened := page.find("<!--", at)) >= 0:
        kept.append(page[at:opened])
        closed = page.find("-->", opened + 4)
        if closed < 0:
            return "".join(kept)
        at = closed + 3
    kept.append(page[at:])
    return "".join(kept)


#: What WeChat's verification page says instead of the article.
_VERIFICATION = re.compile("环境异常|完成验证|去验证|访问过于频繁")
#: Where a 公众号 article's page says when it was published (in a script, so in one step).
_CREATED = re.compile(r"""\bvar\s+ct\s*=\s*["']?(\d{9,11})""")


def page_text(page: str, url: str, card: dict | None = None) -> tuple[str, str, str]:
    """A page's title, text and date (YYYY-MM-DD or ""): a 公众号 article's title from og:title
    or h1#activity-name and text from #js_content; any other page's <title> and the text of
    its <article>, <main> or <body>. Paragraphs and list items are lines; scripts, styles,
    images and the editor's wrapper markup are dropped, entities decoded. LearnError for a
    WeChat verification page. The date: article:published_time, a 公众号 article's `var ct`
    or #publish_time, else a line of the text that dates it (text_date). `card`, when given,
    gets the page's og:description and og:image (its address made whole) as learn_text's
    summary and cover."""
    reader = _PageReader()
    try:
        for piece in page_steps(without_comments(page)):
            reader.feed(_STRAY_LT.sub(_LT, piece.replace(_LT, "\ufffd")))
        reader.close()
    except _EnoughRead:
        pass
    text = ""
    for region in _TEXT_REGIONS:
        # Word by word: a split of a 5 MB line at once would hold the interpreter.
        lines = (" ".join(word.group() for word in _WORD.finditer(line))
                 for line in "".join(reader.regions[region]).splitlines())
        text = "\n".join(line for line in lines if line)
        if text:
            break
    wechat = "mp.weixin.qq.com" in urllib.parse.urlsplit(url).netloc
    if wechat and not reader.regions["js_content"] and _VERIFICATION.search(text[:PAGE_STEP]):
        raise LearnError("WeChat answered with a verification page (环境异常) instead of the "
                         "article: wait a while and learn it again, or save the page from a "
                         "browser and learn the .html file")
    title = " ".join((reader.og_title or reader.h1_title or reader.title).split())
    date = reader.published if re.fullmatch(r"\d{4}-\d\d-\d\d", reader.published) else ""
    if (wechat or reader.regions["js_content"]) and not date:  # a 公众号 article's publish time
        created = next(filter(None, map(_CREATED.search, page_steps(page))), None)
        date = china_date(float(created.group(1))) if created else ""
    if card is not None:
        card.update(summary=reader.meta.get("description", ""), cover=urllib.parse.urljoin(
            url, reader.meta["image"].strip()) if reader.meta.get("image") else "")
    return title, text, date or found_date(reader.shown_time) or text_date(text)


def china_date(timestamp: float) -> str:
    """A Unix time as the date in China (UTC+8), where the account's readers are."""
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp + 8 * 3600))


#: Bumped when passages_of() cuts a text otherwise: an article learned before is then not
#: "unchanged", and is cut anew the next time it is learned or synced.
PASSAGES_VERSION = 2


def article_digest(title: str, text: str, url: str, date: str) -> str:
    """What tells a changed article from an unchanged one (and one cut as passages were)."""
    return hashlib.sha256(f"{PASSAGES_VERSION}\n{title}\n{url}\n{date}\n{text}".encode(
        "utf-8")).hexdigest()


#: The passages holding a term (or all of a few), read from the index alone.
TERM_PASSAGES = "SELECT rowid FROM article_terms WHERE article_terms MATCH ?"
#: The passages nearest in meaning, with their vectors.
PASSAGES_WITH_VECTORS = (
    "SELECT p.id, s.id, s.title, s.url, s.date, p.text, v.vector FROM article_vectors v"
    " JOIN article_passages p ON p.id = v.passage_id JOIN article_sources s ON"
    " s.id = p.source_id WHERE v.passage_id IN ({ids})")
#: The candidates' text and what names their article, by passage id.
PASSAGES_BY_ID = (
    "SELECT p.id, s.id, s.title, s.url, s.date, p.text, p.latin FROM article_passages p"
    " JOIN article_sources s ON s.id = p.source_id WHERE p.id IN ({ids})")
#: In how many passages each term is (fts5vocab looks each up in the index).
VOCABULARY = "SELECT term, doc FROM article_vocabulary WHERE term IN ({terms})"
#: How many passages there are, and when the articles last changed (learn_text, forget).
COUNTED_PASSAGES = ("SELECT coalesce((SELECT value FROM article_state WHERE key = 'passages'),"
                    " 0), (SELECT value FROM article_state WHERE key = 'changed')")

_LATIN_WORD = re.compile(rf"([0-9]+\.[0-9]+|[a-z0-9]+)([{_CJK}]?)")


def latin_terms(folded: str) -> set[str]:
    """The Latin words and numbers article_terms() finds in a folded text, with the
    number-and-character terms (39元) and the words joined by a hyphen (wifi)."""
    terms: set[str] = set(hyphen_joined(folded))
    for word, after in _LATIN_WORD.findall(folded):
        parts = _word_parts(word)
        terms.update(parts)
        if after and parts[0][0].isdigit():
            terms.add(parts[0] + after)
    return terms


def times_shown(folded: str, latin: set[str], term: str) -> int:
    """How often a folded text shows a term of article_terms(): a CJK character or pair as
    written; a Latin word or number once, when it is one of its `latin` terms."""
    return int(term in latin) if term[0].isascii() else folded.count(term)


def unit_times(folded: str, latin: set[str], unit: Unit) -> tuple[int, int]:
    """How often a text shows a unit strongly (its form shown most, by its term shown
    least; 0: not strongly) and, when not strongly, by its characters alone (the one shown
    most)."""
    strongly = max((min(times_shown(folded, latin, term) for term in terms)
                    for terms in unit.strong), default=0)
    return strongly, 0 if strongly else max((times_shown(folded, latin, term)
                                             for term in unit.weak), default=0)


class SearchMemory:
    """What one question's search read, that a search of it with more words reads again:
    each term's passages in the index, each passage's times shown of each unit."""

    def __init__(self) -> None:
        self.passages: dict[str, set[int]] = {}
        self.times: dict[tuple[int, int], tuple[int, int]] = {}


class Articles:
    """The account's articles in the bot's SQLite database: own tables, own connections.

    Safe while the server runs and from several threads: a thread borrows a connection
    from a pool for each call (the console serves each request on a thread of its own, so
    a connection per thread would stay open for every request ever served), and the
    database is in WAL mode, so a `learn` in another process never blocks a search.
    """

    #: At most this many passages go with a question.
    MOST = 5
    #: Passages read from the index that are weighed against the whole question, text in
    #: hand: those showing most of it strongly, the newer article's first.
    CANDIDATES = 120

    #: How long one write of learn_text or forget holds the database: a push waiting for it
    #: is acknowledged a little later, never after WeChat's 5 s. A large article is written in
    #: as many transactions as it takes, PAUSE apart: a writer in another process that found
    #: the database held tries again every 25 to 50 ms (SQLite's busy handler), so it finds
    #: it free within one pause.
    HOLD = 0.02
    PAUSE = 0.05

    def __init__(self, db_path: str, busy_timeout: float = 15.0,
                 turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 private: bool = False):
        """`turn`: the Store's write_turn() in the server, so that pushes write first;
        `private`: pages on this machine and private networks may be learned
        (WXBOT_LEARN_PRIVATE)."""
        with opening_for(db_path):
            create_private(db_path)
        self.path, self.busy_timeout, self._turn = db_path, busy_timeout, turn
        self.private = private
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._counts: dict[str, object] = {}  # term -> passages holding it; "" -> as of when
        self.meaning: Meaning | None = None  # WXBOT_EMBED_MODEL: find() searches by meaning too
        self._passage_dates: tuple[str | None, dict[int, str]] = (None, {})
        with opening_for(db_path), self._reading() as conn:
            # Before the first table, as the Store does: deleted rows give their pages back.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            upgrade_tables(conn, ARTICLES_SCHEMA)
            conn.execute("COMMIT")
            self._allow_notes(conn)
        with self._write() as conn:
            version = conn.execute("SELECT value FROM article_state WHERE key = 'terms'"
                                   ).fetchone()
            if version is None or int(version[0]) != TERMS_VERSION:
                self._reindex(conn)
        self._store_latin()

    @staticmethod
    def _allow_notes(conn: sqlite3.Connection) -> None:
        """A database learned before the owner's notes checks kind against the three kinds
        it knew; SQLite changes no CHECK in place, so the table's definition is rewritten
        (the rows are the same: nothing is copied)."""
        made = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'article_sources'"
                            ).fetchone()[0]
        if "'note'" in made:
            return
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'article_sources'",
                     (made.replace("'file')", "'file', 'note')"),))
        conn.execute(f"PRAGMA schema_version={version + 1}")
        conn.execute("PRAGMA writable_schema=OFF")
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection of the pool for this call only: as many stay open as calls ever ran
        at once."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.busy_timeout)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            # A connection per worker thread: a small page cache each, as the Store's (the
            # index's pages stay in the operating system's cache).
            conn.execute("PRAGMA cache_size=-512")
            # The articles' writes leave the WAL to _in_steps' checkpoints and the Store's.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            with self._lock:
                self._opened.append(conn)
        try:
            yield conn
        finally:
            self._pool.put(conn)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._turn(), self._reading() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
        self._pool = queue.SimpleQueue()

    # Learning ---------------------------------------------------------------

    #: Passages indexed a second when the index is built again (an upgrade), for the log.
    REINDEX_RATE = 2000

    def _reindex(self, conn: sqlite3.Connection) -> None:
        """The index built again, spelled as this wxbot spells terms: once after an upgrade
        that spells them differently, before wxbot listens (as a compaction: the log says how
        long to expect)."""
        passages = conn.execute("SELECT count(*) FROM article_passages").fetchone()[0]
        if passages:
            log.warning("articles: the search index is built again once for this version of "
                        "wxbot: %d passage(s), about %.0f s, before wxbot listens (pushes "
                        "meanwhile are retried by WeChat for 15 s only: upgrade in a quiet "
                        "hour)", passages, passages / self.REINDEX_RATE)
        started = time.monotonic()
        conn.execute("INSERT INTO article_terms (article_terms) VALUES ('delete-all')")
        for row in conn.execute("SELECT p.id, p.text, s.title FROM article_passages p"
                                " JOIN article_sources s ON s.id = p.source_id"):
            conn.execute("INSERT INTO article_terms (rowid, title, body) VALUES (?, ?, ?)",
                         (row[0], " ".join(article_terms(row[2])),
                          " ".join(article_terms(row[1]))))
        conn.execute("INSERT OR REPLACE INTO article_state (key, value) VALUES ('terms', ?)",
                     (str(TERMS_VERSION),))
        if passages:
            log.warning("articles: search index built again in %.1f s", time.monotonic() - started)
        # Spelled as the terms are: found again (_store_latin) as this wxbot spells them.
        conn.execute("UPDATE article_passages SET latin = NULL")
        conn.execute("DELETE FROM article_state WHERE key = 'latin'")
        self._count(conn)

    def _store_latin(self) -> None:
        """A database learned before each passage's Latin words were stored (the latin
        column) has them found once: else a question of V60 or CT folds each candidate's
        text again. Found outside the write lock, written a batch at a time; a failure
        leaves the search reading the text as before."""
        with self._reading() as conn:
            if conn.execute("SELECT 1 FROM article_state WHERE key = 'latin'").fetchone():
                return
            missing = conn.execute("SELECT count(*) FROM article_passages WHERE latin IS NULL"
                                   ).fetchone()[0]
        if missing:
            log_worker.info("articles: storing the Latin words of %d passages learned by an "
                            "earlier wxbot (once; about a second a 10,000)", missing)
        after = 0
        try:
            while True:
                with self._reading() as conn:
                    rows = conn.execute("SELECT id, text FROM article_passages WHERE id > ? AND"
                                        " latin IS NULL ORDER BY id LIMIT 200", (after,)
                                        ).fetchall()
                if not rows:
                    break
                found = [(" ".join(sorted(latin_terms(fold(text)))), passage_id)
                         for passage_id, text in rows]
                with self._write() as conn:  # a passage learned again meanwhile keeps its own
                    conn.executemany("UPDATE article_passages SET latin = ? WHERE id = ? AND"
                                     " latin IS NULL", found)
                after = rows[-1][0]
            with self._write() as conn:  # not while another process left some to find
                conn.execute("INSERT OR REPLACE INTO article_state (key, value) SELECT"
                             " 'latin', '1' WHERE NOT EXISTS (SELECT 1 FROM article_passages"
                             " WHERE latin IS NULL)")
        except sqlite3.Error as error:
            log_worker.warning("articles: the Latin words of earlier passages not stored (%s);"
                               " they are found from the text at each search", error)

    def _passages_holding(self, terms: set[str], conn: sqlite3.Connection, changed: str
                          ) -> dict[str, int]:
        """In how many passages each term is (those in none left out). fts5vocab counts a
        term by reading where it is, 0.2 ms for a common one: the counts are kept until the
        articles change (any process's learn_text or forget)."""
        known = self._counts
        if known.get("") != changed or len(known) > self.COUNTS_KEPT:
            known = self._counts = {"": changed}
        asked = sorted(term for term in terms if term not in known)
        if asked:
            found = dict(conn.execute(VOCABULARY.format(terms=", ".join("?" * len(asked))),
                                      asked).fetchall())
            known.update((term, found.get(term, 0)) for term in asked)
        return {term: known[term] for term in terms if known[term]}

    def _dates(self, conn: sqlite3.Connection, changed: str) -> dict[int, str]:
        """Each passage's article date, read again when the articles changed."""
        with self._lock:
            if self._passage_dates[0] != changed:
                self._passage_dates = (changed, dict(conn.execute(
                    "SELECT p.id, s.date FROM article_passages p JOIN article_sources s"
                    " ON s.id = p.source_id")))
            return self._passage_dates[1]

    @staticmethod
    def _count(conn: sqlite3.Connection) -> None:
        """Note how many passages there are, for find() (counting them there would read them
        all), and that they changed (find() then counts its terms afresh)."""
        conn.execute("INSERT OR REPLACE INTO article_state (key, value) VALUES ('passages',"
                     " (SELECT count(*) FROM article_passages))")
        conn.execute("INSERT OR REPLACE INTO article_state (key, value) VALUES ('changed', ?)",
                     (str(time.time_ns()),))

    def _in_steps(self, work: Generator[None, sqlite3.Connection, None]) -> None:
        """Run a write given the connection at each of its steps (`conn = yield`), as many
        steps in one transaction as HOLD allows: a small article is learned at once, a large
        one in turns, with a PAUSE between them in which a push in another process writes
        (`learn` run from the console while the server runs)."""
        next(work)
        done = False
        while not done:
            with self._write() as conn:
                began = time.monotonic()
                try:
                    while time.monotonic() - began < self.HOLD:
                        work.send(conn)
                except StopIteration:
                    done = True
            # The WAL goes into the database file here, beside the writers, not in a commit of
            # ours while the database is held (fsync and all: half a second on a busy disk).
            with self._reading() as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            if not done:
                time.sleep(self.PAUSE)

    @staticmethod
    def _unindexing(conn: sqlite3.Connection, source_id: int, title: str
                    ) -> Generator[None, sqlite3.Connection, sqlite3.Connection]:
        """Remove a source's passages and their terms (spelled as they were added), a step
        each; returns the connection of the last step."""
        title_terms = " ".join(article_terms(title))
        for passage_id, text in conn.execute(
                "SELECT id, text FROM article_passages WHERE source_id = ?",
                (source_id,)).fetchall():
            conn.execute("INSERT INTO article_terms (article_terms, rowid, title, body)"
                         " VALUES ('delete', ?, ?, ?)",
                         (passage_id, title_terms, " ".join(article_terms(text))))
            conn.execute("DELETE FROM article_passages WHERE id = ?", (passage_id,))
            conn = yield
        return conn

    def learn_text(self, kind: str, origin: str, title: str, text: str, url: str = "",
                   date: str = "", now: float | None = None, summary: str = "",
                   cover: str = "") -> Source:
        """Learn a text as passages, replacing what was learned before from the same origin;
        `summary` and `cover` are what its card shows (Articles.card). The same text from the
        same origin is left as it is: no write, no write lock (a rerun of `learn` over a
        thousand files rewrote them all, and grew the file). Until it is all written, the
        source has no digest (a sync learns it again)."""
        # WeChat's own titles are at most 64 characters: a page's <title> is not bounded.
        title = (" ".join(unified_cjk(title).split()) or os.path.basename(origin) or origin
                 )[:TITLE_CHARS]
        text = unified_cjk(text)
        if kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SOURCE_KINDS)}, not {kind!r}")
        pieces = passages_of(text)
        if not pieces:
            raise LearnError("no text in it")
        summary = " ".join(summary.split())[:SUMMARY_CHARS]
        # WeChat fetches the picture itself: a web address that fits its field, or none.
        cover = cover if re.match(r"https?://\S+\Z", cover) and len(cover) <= LINK_MOST else ""
        digest = article_digest(title, text, url, date)
        now = time.time() if now is None else now
        with self._reading() as conn:
            row = conn.execute("SELECT id, kind, origin, title, url, date, passages, learned_at"
                               " FROM article_sources WHERE origin = ? AND kind = ? AND"
                               " digest = ? AND summary = ? AND cover = ?",
                               (origin, kind, digest, summary, cover)).fetchone()
        if row:
            return Source(*row, unchanged=True)
        # The words are found before the database is held.
        title_terms = " ".join(article_terms(title))
        passages = [(piece, " ".join(article_terms(piece)),
                     " ".join(sorted(latin_terms(fold(piece))))) for piece in pieces]
        learned: list[int] = []

        def learning() -> Generator[None, sqlite3.Connection, None]:
            conn = yield
            row = conn.execute("SELECT id, title FROM article_sources WHERE origin = ?",
                               (origin,)).fetchone()
            if row:
                source_id = row[0]
                conn.execute("UPDATE article_sources SET kind = ?, url = ?, date = ?,"
                             " digest = '', learned_at = ?, summary = ?, cover = ? WHERE id = ?",
                             (kind, url, date, now, summary, cover, source_id))
                conn = yield from self._unindexing(conn, source_id, row[1])
                # The new title only once no passage indexed with the old one is left: a
                # learn cut short is finished by the next, which removes what is left of
                # the passages with the terms they were indexed with (else FTS5's
                # contentless index is corrupted).
                conn.execute("UPDATE article_sources SET title = ? WHERE id = ?",
                             (title, source_id))
            else:
                source_id = conn.execute(
                    "INSERT INTO article_sources (kind, origin, title, url, date, passages,"
                    " digest, learned_at, summary, cover) VALUES (?, ?, ?, ?, ?, 0, '', ?, ?, ?)",
                    (kind, origin, title, url, date, now, summary, cover)).lastrowid
            learned.append(source_id)
            for piece, terms, latin in passages:
                passage_id = conn.execute("INSERT INTO article_passages (source_id, text, latin)"
                                          " VALUES (?, ?, ?)", (source_id, piece, latin)
                                          ).lastrowid
                conn.execute("INSERT INTO article_terms (rowid, title, body) VALUES (?, ?, ?)",
                             (passage_id, title_terms, terms))
                conn = yield
            conn.execute("UPDATE article_sources SET passages = ?, digest = ? WHERE id = ?",
                         (len(pieces), digest, source_id))
            self._count(conn)

        self._in_steps(learning())
        return Source(learned[0], kind, origin, title, url, date, len(pieces), now)

    def forget(self, origin_or_id: str, published: bool = False) -> bool:
        """Forget a source by its origin (URL, path, article_id) or its id; False if unknown.
        `published`: only the published post of that article_id (WeChat names a post; a
        number it sends is no row id, nor a file's name)."""
        origin_or_id = str(origin_or_id)
        with self._reading() as conn:
            row = conn.execute("SELECT id FROM article_sources WHERE origin = ? AND (kind ="
                               " 'published' OR NOT ?)", (origin_or_id, published)).fetchone()
            if row is None and not published and origin_or_id.isdigit():
                row = conn.execute("SELECT id FROM article_sources WHERE id = ?",
                                   (int(origin_or_id),)).fetchone()
            if row is None and not published and os.path.exists(origin_or_id):
                row = conn.execute("SELECT id FROM article_sources WHERE origin = ?",
                                   (os.path.abspath(origin_or_id),)).fetchone()
            if row is None:
                return False
            # A published post's second and later articles are article_id/2, article_id/3...
            ids = [row[0]] + [other for (other,) in conn.execute(
                "SELECT id FROM article_sources WHERE kind = 'published' AND origin > ?"
                " AND origin < ?", (origin_or_id + "/", origin_or_id + "0"))]
        self._in_steps(self._forgetting(ids))
        return True

    def _forgetting(self, ids: list[int]) -> Generator[None, sqlite3.Connection, None]:
        conn = yield
        for source_id in ids:
            row = conn.execute("SELECT title FROM article_sources WHERE id = ?",
                               (source_id,)).fetchone()
            if row is None:
                continue  # forgotten meanwhile
            conn.execute("UPDATE article_sources SET digest = '' WHERE id = ?", (source_id,))
            conn = yield from self._unindexing(conn, source_id, row[0])
            conn.execute("DELETE FROM article_sources WHERE id = ?", (source_id,))
        self._count(conn)

    def digests(self, kind: str) -> dict[str, str]:
        """Each learned source of a kind, by origin: what it was learned from, as
        article_digest() summed it up (a sync skips the unchanged ones)."""
        with self._reading() as conn:
            return dict(conn.execute("SELECT origin, digest FROM article_sources"
                                     " WHERE kind = ?", (kind,)))

    def sources(self) -> list[Source]:
        """Every learned source, newest article first."""
        with self._reading() as conn:
            return [Source(*row) for row in conn.execute(
                "SELECT id, kind, origin, title, url, date, passages, learned_at"
                " FROM article_sources ORDER BY date DESC, id DESC")]

    def last_sync(self) -> float | None:
        """When the published articles were last synced (None: never, so no sync)."""
        with self._reading() as conn:
            row = conn.execute("SELECT value FROM article_state WHERE key = 'synced'"
                               ).fetchone()
        return float(row[0]) if row else None

    def note_sync(self, at: float) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO article_state (key, value) VALUES"
                         " ('synced', ?)", (repr(at),))

    # Learning from pages, files and folders ---------------------------------

    def learn(self, source: str, fetch: Callable[[str], "Page"] | None = None,
              now: float | None = None) -> Source:
        """Learn a URL, a file (.md, .txt, .html) or a folder (its files of those kinds,
        recursively): the CLI's `learn SOURCE`. A folder returns its last file's Source and
        raises LearnError naming each file that failed, once the others are learned
        (learn_many tells file by file). LearnError says why a source was not learned."""
        failed, learned = [], None
        for name, outcome in self.learn_many([source], fetch, now):
            if isinstance(outcome, LearnError):
                failed.append(f"{name}: {outcome}" if name != source else str(outcome))
            else:
                learned = outcome
        if failed:
            raise LearnError("; ".join(failed))
        return learned

    def learn_many(self, sources: Iterable[str], fetch: Callable[[str], "Page"] | None = None,
                   now: float | None = None
                   ) -> Iterator[tuple[str, Source | LearnError]]:
        """Learn each source in turn (a folder's files one by one): (its name, the Source
        learned, or the LearnError that says why not). One bad source stops no other."""
        fetch = fetch or functools.partial(fetch_page, private=self.private)
        for source in sources:
            if re.match(r"https?://", source, re.I):
                yield source, self._catch(lambda: self._learn_url(source, fetch, now))
            elif os.path.isdir(source):
                files = list(article_files(source))
                if not files:
                    yield source, LearnError("no .md, .txt or .html file in this folder")
                for path in files:
                    yield path, self._catch(lambda: self._learn_file(path, now))
            else:
                yield source, self._catch(lambda: self._learn_file(source, now))

    @staticmethod
    def _catch(learn: Callable[[], Source]) -> Source | LearnError:
        try:
            return learn()
        except LearnError as error:
            return error

    def _learn_url(self, url: str, fetch: Callable[[str], "Page"], now: float | None) -> Source:
        page = fetch(url)
        card: dict[str, str] = {}
        title, text, date = page_text(page.html, page.url, card)
        if not text.strip():
            raise LearnError("the page has no text")
        shown = shown_url(page.url)
        return self.learn_text("url", url, title or shown, text, url=shown,
                               date=date, now=now, **card)

    def _learn_file(self, path: str, now: float | None) -> Source:
        path = os.path.abspath(path)
        extension = os.path.splitext(path)[1].lower()
        if extension not in ARTICLE_FILES:
            raise LearnError("not a .md, .txt or .html file, nor a folder, nor an http(s) URL")
        try:
            found = os.stat(path)
            # A pipe or device would block or never end; a log is no article.
            if not stat.S_ISREG(found.st_mode):
                raise LearnError("not a regular file")
            if found.st_size > PAGE_BYTES:
                raise LearnError(f"larger than {PAGE_BYTES // 1024 // 1024} MB: no article")
            with open(path, "rb") as file:
                raw = file.read(PAGE_BYTES + 1)
            modified = time.strftime("%Y-%m-%d", time.localtime(found.st_mtime))
        except OSError as error:
            raise LearnError(f"cannot read it: {error.strerror or error}") from None
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise LearnError("not UTF-8 text: save it as UTF-8 and learn it again") from None
        if not content.strip():
            raise LearnError("the file is empty")
        if extension in (".html", ".htm"):
            title, text, date = page_text(content, "")
        else:
            title, text, date = markdown_text(content)
        if not text.strip():
            raise LearnError("no text in it")
        # The article's own date: the file's time says when it was last saved, not written.
        return self.learn_text("file", path, title or os.path.basename(path), text,
                               date=date or modified, now=now)

    def card(self, source_ids: Sequence[int]) -> Card | None:
        """The card of the first of these articles that has one. A published post's first
        article is sent by its article_id (mpnewsarticle); WeChat shows a post by its first
        article, so a later one (article_id/2...) and a page learned by URL are a `news` card
        of their own: title, summary, link and picture, only where there is a picture (the
        pages without one keep the 来源 line's link). Files and notes have none."""
        with self._reading() as conn:
            for source_id in source_ids:
                row = conn.execute("SELECT kind, origin, title, url, summary, cover FROM"
                                   " article_sources WHERE id = ?", (source_id,)).fetchone()
                if row is None or row[0] not in ("published", "url"):
                    continue
                kind, origin, title, url, summary, cover = row
                line = SOURCES_HEAD + source_link(Passage(source_id, title, url, "", ""))
                if kind == "published" and "/" not in origin:
                    return Card(source_id, {"msgtype": "mpnewsarticle",
                                            "mpnewsarticle": {"article_id": origin}}, line)
                if cover and Markdown.WEB.match(url):
                    return Card(source_id, {"msgtype": "news", "news": {"articles": [{
                        "title": title, "description": summary, "url": url,
                        "picurl": cover}]}}, line)
        return None

    # Use --------------------------------------------------------------------

    def note_use(self, message_id: int, at: float, given: int, cited: int) -> None:
        """Record, per answered question, how many passages went to the model and how many
        the answer cited (0 given = a question no article covered)."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO article_uses (message_id, at, given, cited)"
                         " VALUES (?, ?, ?, ?)", (message_id, at, given, cited))

    def forget_uses(self, before: float) -> None:
        """Drop the uses noted before a time (WXBOT_RETENTION_DAYS), a few thousand a time."""
        while True:
            with self._write() as conn:
                if not conn.execute("DELETE FROM article_uses WHERE message_id IN (SELECT"
                                    " message_id FROM article_uses WHERE at < ? LIMIT 5000)",
                                    (before,)).rowcount:
                    return

    def uses_since(self, since: float) -> tuple[int, int, int]:
        """(questions asked, questions given passages, questions answered with a citation)."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(given > 0), 0), coalesce(sum(cited > 0), 0)"
                " FROM article_uses WHERE at >= ?", (since,)).fetchone()
        return row[0], row[1], row[2]

    # Finding ----------------------------------------------------------------

    #: A passage goes with the question only when what it shows of the question weighs this
    #: share of the question (each unit weighed by how rare it is in the articles).
    FLOOR = 0.27
    #: What a character found alone in a passage (not beside its neighbour) counts for.
    ALONE = 0.3
    #: How much the earlier question's units weigh beside the question's own.
    EARLIER_WEIGHT = 0.5
    #: Passages read from the index for one question, the rarest words' first (each costs
    #: about a microsecond; a word in thousands of passages says little which to weigh).
    BUDGET = 8000
    #: Terms whose counts are kept between questions (a few MB at most).
    COUNTS_KEPT = 50000

    def find(self, question: str, earlier: Sequence[str] = (),
             search_words: Callable[[str, Sequence[str]], str | None] | None = None
             ) -> list[Passage]:
        """Passages that answer `question` (with the user's earlier question(s) for a
        follow-up), best first, at most a handful; [] when nothing relevant (relevance floor).
        With a Meaning (WXBOT_EMBED_MODEL), the passages nearest the question's meaning join
        those of the word search (reciprocal rank fusion): 牙医 finds 口腔科.

        `search_words(question, earlier)` is asked, when the question's own words meet no
        passage well (below CONFIDENT), for the words an article would use (the model's
        search_words()): they join the question's, weighing SEARCH_WORDS_WEIGHT. It returns
        None for a question about nothing the account writes of (small talk): no passage."""
        # A question is searched by its beginning: 4,000 characters took a third of a second.
        question, earlier = question[:QUESTION_SEARCHED], [line[:QUESTION_SEARCHED]
                                                           for line in list(earlier)[-1:]]
        units = {key: (1.0, unit) for key, unit in question_units(question).items()}
        # 谢谢, 在吗, 你是谁: a word of one character says nothing to search for.
        says = sum(0.5 if len(key) == 1 and not key.isascii() else 1 for key in units) >= 1
        if not earlier and not says:
            return []
        for before in earlier:
            for key, unit in question_units(before).items():
                units.setdefault(key, (self.EARLIER_WEIGHT, unit))
        with self._reading() as conn:
            # 那…, …呢, 还…: the question goes on from the earlier one, whose words may carry it.
            alone = not (earlier and GOES_ON.search(question.strip()))
            read = SearchMemory()  # what this search read, the searches below read again
            words = self._find(conn, units, alone, says, read) if units else []
            shown = max((item[4] for item in words), default=0.0)  # of the question, at best
            about_articles = bool(words)
            if search_words and shown < self.CONFIDENT and \
                    int(conn.execute(COUNTED_PASSAGES).fetchone()[0]):
                written = search_words(question, earlier)
                if written is None:
                    return []
                written_units = question_units(written)
                # The model wrote words the articles use: the question is no small talk.
                held = self._held_units(conn, written_units)
                about_articles = about_articles or bool(held)
                for key, unit in written_units.items():
                    units.setdefault(key, (self.SEARCH_WORDS_WEIGHT, unit))
                if written.strip():
                    words = self._find(conn, units, alone, says, read)
                if held and len(words) < self.MOST:
                    # Places left: filled by those of the model's words the articles use,
                    # searched alone. Beside the question's, a passage showing one of them
                    # shows too little of all (有宵夜吗 → 夜宵 宵夜 营业时间 深夜食堂: the
                    # 夜宵 menu's passage); the words no article uses weigh most, and are
                    # only the model's guesses; 时间 asks (小时 is in every opening time).
                    given = {item[2] for item in words}
                    words += [item for item in self._find(conn, {
                        key: (1.0, unit) for key, unit in held.items()
                        if key not in _ASKING_GROUP}, memory=read) if item[2] not in given]
            near = self.meaning.nearest(conn, question, earlier, about_articles) \
                if self.meaning else []
            if not near:
                return [item[3] for item in words[:self.MOST]]
            fused: dict[int, list] = {}
            for ranked in (words, near):
                for rank, (_, _, passage_id, passage, *_) in enumerate(ranked):
                    fused.setdefault(passage_id, [0.0, passage])[0] += 1 / (self.FUSION + rank)
            best = sorted(fused.values(), key=lambda item: -item[0])
            return [passage for _, passage in best[:self.MOST]]

    def _held_units(self, conn: sqlite3.Connection, units: dict[str, Unit]
                    ) -> dict[str, Unit]:
        """Those of the units whose words the articles hold (a pair of characters or more,
        a Latin word), not one character alone."""
        terms = {term for unit in units.values() for shown in unit.strong for term in shown}
        found_in = self._passages_holding(terms, conn, conn.execute(COUNTED_PASSAGES
                                                                    ).fetchone()[1])
        return {key: unit for key, unit in units.items() if any(
            all(term in found_in for term in shown) and any(len(term) > 1 for term in shown)
            for shown in unit.strong)}

    @staticmethod
    def _held(unit: Unit, found_in: dict[str, int]) -> bool:
        """Whether the articles hold each term of one of the unit's strong forms."""
        return any(all(term in found_in for term in shown) for shown in unit.strong)

    def _spelled_out(self, conn: sqlite3.Connection, changed: str, found: set[str]
                     ) -> set[str]:
        """Those of the three characters found for a pair a character apart (科目四 for 科四)
        made of two pairs the articles use elsewhere too (科目, 目四), not met by chance
        (三天排气 for 天气); the first SPELLED_OUT of them, in one look at the index."""
        found = set(sorted(found)[:self.SPELLED_OUT])
        counts = self._passages_holding({part for three in found
                                         for part in (three[:2], three[1:])}, conn, changed)
        return {three for three in found
                if counts.get(three[:2], 0) > 1 and counts.get(three[1:], 0) > 1}

    #: At most this many of a question's pairs are looked for a character apart, and this
    #: many different spellings of them in its candidates are looked up in the index.
    APART, SPELLED_OUT = 8, 64

    #: Reciprocal rank fusion's constant: a passage's weight in a list is 1 / (FUSION + rank).
    FUSION = 10
    #: A best passage showing this share of the question: no search words are asked for.
    CONFIDENT = 0.9
    #: What a search word the model wrote weighs beside the question's own.
    SEARCH_WORDS_WEIGHT = 0.7

    def _find(self, conn: sqlite3.Connection, units: dict, alone: bool = True,
              says: bool = True, memory: "SearchMemory | None" = None) -> list[list]:
        """The word search: [score, date, passage id, Passage, share of the question shown]
        best first. `says`: the question says enough to be searched alone (not 谢谢);
        `memory`: what earlier searches of the same question read (its search words' search
        reads the index and the passages once)."""
        memory = memory or SearchMemory()
        total, changed = conn.execute(COUNTED_PASSAGES).fetchone()
        total = int(total)
        if not total:
            return []
        terms = {term for _, unit in units.values() for shown in (*unit.strong, unit.weak)
                 for term in shown}
        found_in = self._passages_holding(terms, conn, changed)
        searched, weight, reachable = {}, {}, {}
        for key, (importance, unit) in units.items():
            # Searched for: what shows the unit strongly, where it exists (a passage that shows
            # no unit strongly is not given, below).
            for shown in unit.strong:
                if all(term in found_in for term in shown):
                    searched.setdefault(shown, [min(found_in[term] for term in shown), set()]
                                        )[1].add(key)
            # Weighed by how rare it is: a character by itself, a group of words together.
            counted = [unit.weak] if unit.weak else unit.strong
            passages = min(total, sum(min(found_in.get(term, 0) for term in shown)
                                      for shown in counted))
            weight[key] = importance * math.log((total - passages + 0.5) / (passages + 0.5) + 1)
            reachable[key] = 1.0 if self._held(unit, found_in) else \
                self.ALONE if any(term in found_in for term in unit.weak) else 0.0
        # A pair of the question's own that no passage holds, though its characters are there:
        # perhaps the reader's abbreviation of a word that has one between them (科四 for
        # 科目四, 社保 for 社会保险). Passages with both characters are read, and a passage
        # showing them a character apart, in two pairs the articles use, shows the unit.
        apart: dict[str, list[str]] = collections.defaultdict(list)  # unit -> patterns
        for key, (importance, unit) in units.items():
            for (pair, *more) in unit.strong if importance == 1.0 else ():
                if not more and len(pair) == 2 and not pair.isascii() and \
                        pair not in found_in and pair[0] != pair[1] and \
                        pair[0] in found_in and pair[1] in found_in and \
                        sum(map(len, apart.values())) < self.APART:
                    apart[key].append(f"{re.escape(pair[0])}(?![{BETWEEN_WORDS}])[{_CJK}]"
                                      f"{re.escape(pair[1])}")
                    searched.setdefault(frozenset(pair), [min(found_in[pair[0]],
                                                              found_in[pair[1]]), set()]
                                        )[1].add(key)
        shown_apart = {key: re.compile("|".join(patterns)) for key, patterns in apart.items()}
        whole = sum(weight.values())
        # No passage can reach the floor when what the articles hold of the question weighs
        # too little (咖啡渣: 咖啡 is everywhere, 渣 nowhere): nothing to search.
        if not searched or sum(weight[key] * reachable[key] for key in units) < \
                self.FLOOR * whole:
            return []
        # Candidates: every passage that shows a unit strongly, each weighed by the units it
        # shows, read from the index term by term, the rarest first, until BUDGET passages
        # were read (a term in most passages says little about which to read). The best
        # CANDIDATES are then weighed against the whole question, text in hand.
        showing: dict[str, set[int]] = collections.defaultdict(set)  # unit -> passages
        read = 0
        for shown, (count, keys) in sorted(searched.items(), key=lambda item: item[1][0]):
            if read and read + count > self.BUDGET:
                break
            read += count
            query = " AND ".join(f'"{term}"' for term in sorted(shown))
            rowids = memory.passages.get(query)
            if rowids is None:
                rowids = memory.passages[query] = {
                    rowid for (rowid,) in conn.execute(TERM_PASSAGES, (query,))}
            for key in keys:
                showing[key] |= rowids
        found: dict[int, float] = {}
        for key, rowids in showing.items():
            # Added unit by unit, as sets: most passages show one unit.
            both = rowids & found.keys()
            found.update(dict.fromkeys(rowids - both, weight[key]))
            for rowid in both:
                found[rowid] += weight[key]
        best = self._candidates(found, self._dates(conn, changed))
        if not best:
            return []
        rows = conn.execute(PASSAGES_BY_ID.format(ids=", ".join("?" * len(best))),
                            best).fetchall()
        latin_asked = any(term[0].isascii() for term in terms)
        # The question's own units, and the search words written for it.
        own = {key for key, (importance, _) in units.items() if importance > self.EARLIER_WEIGHT}
        own_whole = sum(weight[key] for key in own)
        named = {key for key in own if key not in _ASKING_GROUP}
        after_earlier = own_whole > 0 and len(own) < len(units)
        scored, below = [], []
        # CJK characters are as NFKC and lower() leave them: the text is read as it is
        # (folding each candidate cost more than the rest), its Latin words as stored.
        texts = [priced(f"{row[2]}\n{row[5]}") for row in rows]
        apart_in = [{key: set(pattern.findall(folded)) for key, pattern in shown_apart.items()}
                    for folded in texts] if shown_apart else [{}] * len(rows)
        spelled = set() if not shown_apart else self._spelled_out(conn, changed, set().union(
            *(found for shown in apart_in for found in shown.values())))
        for (passage_id, source_id, title, url, date, text, latin), folded, shown_apart_here \
                in zip(rows, texts, apart_in):
            latin = set() if not latin_asked else latin_terms(fold(title)).union(
                latin.split() if latin is not None else latin_terms(fold(text)))
            shown = {}  # unit -> how often shown: strongly, by its characters alone
            for key, (_, unit) in units.items():
                known = (passage_id, id(unit))
                if known not in memory.times:
                    memory.times[known] = unit_times(folded, latin, unit)
                shown[key] = memory.times[known]
            strongly = {key for key, (often, _) in shown.items() if often}
            strongly |= {key for key, found in shown_apart_here.items() if found & spelled}
            # What each unit counts for here: shown strongly, by its characters alone, or not.
            counts = {key: weight[key] * (1.0 if key in strongly else self.ALONE if alone_times
                                          else 0.0)
                      for key, (_, alone_times) in shown.items()}
            share = sum(counts.values()) / whole
            # Characters found only one by one are no sign the passage is on the subject;
            # nor are the earlier question's words alone, when the question says enough of
            # its own to stand alone (明天天气怎么样 after 手冲咖啡 is not about 手冲咖啡;
            # 收费吗 after 能停车吗 is about parking). What the question alone would find,
            # the earlier question's words take nothing from (价格多少钱 after 周日营业吗
            # still finds the prices).
            alone_share = sum(counts[key] for key in own) / own_whole \
                if after_earlier and says else 0.0
            if not strongly:
                continue
            above = share >= self.FLOOR and (strongly & own or len(own) < 3 or not alone) \
                or alone_share >= self.FLOOR and strongly & own
            # Below the floor: a word of the question's own, not only how it asks (多少钱 is
            # in every price) nor only words in every passage.
            if above or strongly & named and share >= self.FLOOR / 4:
                score = share + self.SATURATED * self._saturated(len(folded), shown,
                                                                 weight) / whole
                (scored if above else below).append([
                    score, date, passage_id, frozenset(strongly),
                    Passage(source_id, title, url, date, text), share])
        # The floor says whether the question is about the articles at all. When it is, the
        # few passages above it are joined by the best of those below (今年物业费还涨吗 found
        # the dog rules that say 今年 and 涨; the fee's passage says 物业服务费).
        ordered = self._newer_first(scored)
        if ordered and len(ordered) < self.MOST:
            ordered += self._newer_first(below)[:self.MOST - len(ordered)]
        return [[score, date, passage_id, passage, share] for score, date, passage_id, _,
                passage, share in ordered]

    def _candidates(self, found: dict[int, float], dates: dict[int, str]) -> list[int]:
        """The CANDIDATES passages found weighing most; among those weighing as much, the
        newer article's (a passage's place in the index says only when it was learned)."""
        if len(found) <= self.CANDIDATES:
            return list(found)
        taken, least = 0, 0.0
        for least, count in sorted(collections.Counter(found.values()).items(), reverse=True):
            taken += count
            if taken >= self.CANDIDATES:
                break
        best = [rowid for rowid, weighs in found.items() if weighs > least]
        tied = [rowid for rowid, weighs in found.items() if weighs == least]
        return best + heapq.nlargest(self.CANDIDATES - len(best), tied,
                                     key=lambda rowid: (dates.get(rowid, ""), rowid))

    #: How much a passage's BM25 weighing (how often it shows each word, for its length)
    #: counts beside its share of the question: among passages showing as much of the
    #: question, the one about it rather than mentioning it in passing.
    SATURATED = 2.0
    K1, B, AVERAGE = 1.2, 0.75, 400.0

    def _saturated(self, length: int, shown: dict[str, tuple[int, int]], weight: dict
                   ) -> float:
        """BM25's weighing of how often a passage (of `length` characters) shows each unit
        (unit_times()), for its length."""
        norm = self.K1 * (1 - self.B + self.B * length / self.AVERAGE)
        total = 0.0
        for key, (strongly, alone) in shown.items():
            often = strongly or self.ALONE * alone
            total += weight[key] * often * (self.K1 + 1) / (often + norm)
        return total / (self.K1 + 1)

    #: Passages whose share of the question is within this of the best are as good an answer:
    #: among them the newer article goes first (a price, an opening hour changed since).
    SAME_ANSWER = 0.05

    def _newer_first(self, scored: list[list]) -> list[list]:
        """The scored passages ([share, date, id, words shown, Passage]) best first; among
        those about as good that show the same words of the question, the newer article
        first: it holds what the older said before it changed."""
        scored.sort(key=lambda item: (-item[0], -item[2]))
        ordered = []
        while scored and len(ordered) < 2 * self.MOST:  # the few that can be given
            top = scored[0]
            near = [item for item in scored if item[0] >= top[0] - self.SAME_ANSWER and
                    item[3] == top[3]]
            chosen = max(near, key=lambda item: (item[1] or "", item[0], item[2]))
            scored.remove(chosen)
            ordered.append(chosen)
        return ordered


###############################################################################
# Articles: search by meaning (optional) ######################################
###############################################################################

def meaning_bytes(vector: Sequence[float]) -> bytes:
    """A vector as stored: each component scaled to a signed byte (a quarter of the room of
    floats, the same nearest passages)."""
    scale = 127.0 / (max(abs(x) for x in vector) or 1.0)
    return bytes(round(x * scale) & 0xFF for x in vector)


def meaning_signs(vector: Sequence[float] | bytes) -> int:
    """A vector's signs as the bits of an int: the distance between two (the bits that differ)
    says how near they are, 20,000 compared in a few milliseconds."""
    if isinstance(vector, bytes):  # in C: 20,000 of 1,536 bytes in a few milliseconds
        return int(vector.translate(_SIGN_DIGITS) or b"0", 2)
    return int("".join("1" if x > 0 else "0" for x in vector) or "0", 2)


#: A stored component's byte as the digit of its sign: 1 for 1 to 127, else 0.
_SIGN_DIGITS = bytes(ord("1") if 0 < byte < 128 else ord("0") for byte in range(256))


def meaning_cosine(question: Sequence[float], stored: bytes) -> float:
    values = array.array("b", stored)
    return sum(map(operator.mul, question, values)) / (math.hypot(*values) or 1.0)


class Meaning:
    """The articles searched by meaning as well as by words, through the provider's
    OpenAI-compatible /embeddings (WXBOT_EMBED_MODEL): readers' words that articles do not
    use (牙医 / 口腔科, 美林 / 布洛芬) find their passage.

    Each passage's vector is computed once, in batches, by the thread that runs learn()
    (never on the webhook's path); a question costs one call. A failed or slow call leaves
    the word search alone for that question, logged once until the calls work again.
    """

    #: The question's call: beyond this the answer goes on with the word search alone.
    ASK_TIMEOUT = 3.0
    #: Passages a learning call sends at once, and its deadline.
    BATCH, LEARN_TIMEOUT = 32, 60.0
    #: Products of components the exact weighing of the nearest by their signs may cost.
    PRODUCTS = 40000
    #: When the words found nothing, a passage is near only when it stands this many
    #: deviations out from the passages as a whole (a question about the weather is about as
    #: near to all of them).
    STANDOUT = 3.0
    #: At most this many passages come from the meaning search.
    MOST = 10

    def __init__(self, settings: Settings):
        self.model = settings.embed_model
        self.client = openai.OpenAI(
            api_key=settings.embed_api_key or settings.openai_api_key,
            base_url=settings.embed_base_url or settings.openai_base_url or None,
            timeout=self.LEARN_TIMEOUT, max_retries=0)
        self._index: tuple = ("", [], [])  # (as of when, passage ids, their signs)
        self._dimensions: int | None = None  # the model's, once it answered
        self._lock = threading.Lock()
        self.failure = Failing()

    def vectors(self, texts: list[str], timeout: float) -> list[list[float]]:
        """The model's vectors of the texts, in their order. ModelError when the call fails."""
        try:
            answer = self.client.embeddings.create(model=self.model, input=texts,
                                                   encoding_format="float", timeout=timeout)
            found = sorted(answer.data, key=lambda item: item.index)
            vectors = [list(map(float, item.embedding)) for item in found]
        except openai.APIStatusError as error:
            raise ModelError(f"the embeddings API answered HTTP {error.status_code}",
                             "fatal" if error.status_code in (400, 401, 403, 404) else
                             "transient") from None
        except openai.APIError as error:
            raise ModelError(f"the embeddings API could not be reached ({type(error).__name__})"
                             ) from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ModelError(f"the embeddings API answered otherwise than documented ({error})"
                             ) from None
        if len(vectors) != len(texts) or not all(vectors):
            raise ModelError("the embeddings API answered with another number of vectors")
        return vectors

    def _worked(self, error: ModelError | None) -> None:
        if not self.failure.turned(error is not None):
            return
        if error:
            log.error("articles are searched by words alone: %s (WXBOT_EMBED_MODEL=%s; check "
                      "it, WXBOT_EMBED_BASE_URL and WXBOT_EMBED_API_KEY, or `python wxbot.py "
                      "check`)", error, self.model)
        else:
            log.info("the embeddings API works again: articles are searched by meaning too")

    def learn(self, articles: "Articles", stopping: threading.Event | None = None) -> int:
        """Compute the vectors of the passages that have none (or another model's), a batch
        at a time, each batch written in a short transaction of its own. How many were
        computed; stops at the first failed call (the next run goes on from there)."""
        done = 0
        while not (stopping and stopping.is_set()):
            with articles._reading() as conn:
                batch = conn.execute(
                    "SELECT p.id, s.title, p.text FROM article_passages p JOIN article_sources"
                    " s ON s.id = p.source_id LEFT JOIN article_vectors v ON v.passage_id ="
                    " p.id WHERE v.passage_id IS NULL OR v.model != ? OR length(v.vector) != ?"
                    " LIMIT ?", (self.model, self._dimensions or -1, self.BATCH)).fetchall()
                if self._dimensions is None:
                    batch = batch[:1]  # the model's dimensions first, from one passage
            if not batch:
                return done
            try:
                vectors = self.vectors([f"{title}\n{text}" for _, title, text in batch],
                                       self.LEARN_TIMEOUT)
            except ModelError as error:
                self._worked(error)
                return done
            self._worked(None)
            with articles._write() as conn:
                conn.executemany("INSERT OR REPLACE INTO article_vectors (passage_id, model,"
                                 " vector) SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM"
                                 " article_passages WHERE id = ?)",
                                 [(row[0], self.model, meaning_bytes(vector), row[0])
                                  for row, vector in zip(batch, vectors)])
                # find() reads the vectors again (a vector replaced changes no count).
                conn.execute("INSERT OR REPLACE INTO article_state (key, value) VALUES"
                             " ('vectors', ?)", (str(time.time_ns()),))
            self._dimensions = len(vectors[0])
            done += len(batch)
        return done

    def run(self, articles: "Articles", stopping: threading.Event, every: float = 60.0
            ) -> None:
        """The server's thread: the vectors of what was learned since, once a minute."""
        while not stopping.is_set():
            try:
                learned = self.learn(articles, stopping)
                if learned:
                    log.info("articles: %d passage(s) can now be found by meaning", learned)
            except sqlite3.Error as error:
                log.error("articles: vectors not stored (%s); trying again in a minute", error)
            stopping.wait(every)

    def _signs(self, conn: sqlite3.Connection) -> tuple[list[int], list[int]]:
        """Every passage's id and vector signs, read again when the articles changed."""
        changed = conn.execute("SELECT coalesce((SELECT value FROM article_state WHERE key ="
                               " 'changed'), '') || ':' || coalesce((SELECT value FROM"
                               " article_state WHERE key = 'vectors'), '')").fetchone()[0]
        with self._lock:
            if self._index[0] != changed:
                rows = conn.execute("SELECT passage_id, vector FROM article_vectors WHERE"
                                    " model = ?", (self.model,)).fetchall()
                # Only vectors as long as the model's now: one that changed its dimensions
                # under the same name has its passages' vectors made again (learn()).
                dimensions = collections.Counter(len(row[1]) for row in rows).most_common(1)
                rows = [row for row in rows if dimensions and len(row[1]) == dimensions[0][0]]
                self._index = (changed, [row[0] for row in rows],
                               [meaning_signs(row[1]) for row in rows])
            return self._index[1], self._index[2]

    def nearest(self, conn: sqlite3.Connection, question: str, earlier: Sequence[str],
                about_articles: bool) -> list[list]:
        """The passages nearest the question's meaning, [cosine, date, passage id, Passage]
        nearest first; [] when the call fails. Unless the question is `about_articles` (the
        words found passages, or the model wrote search words for it), only those that stand
        out from the rest: a question about the weather is about as near to all of them."""
        ids, signs = self._signs(conn)
        if len(ids) < 2:
            return []
        try:
            asked = self.vectors([" ".join([*list(earlier)[-1:], question])],
                                 self.ASK_TIMEOUT)[0]
        except ModelError as error:
            self._worked(error)
            return []
        self._worked(None)
        if self._dimensions is not None and len(asked) != self._dimensions:
            return []  # the model changed its dimensions: learn() makes the vectors again
        mine = meaning_signs(asked)
        distances = [(mine ^ theirs).bit_count() for theirs in signs]
        # Signs alone rank roughly (384 of a small model's more roughly than 1,536): the
        # nearest few dozen are weighed exactly, as many as cost about PRODUCTS products.
        shortlist = heapq.nsmallest(max(self.MOST, self.PRODUCTS // len(asked)),
                                    range(len(ids)), key=distances.__getitem__)
        if not about_articles:
            # By hand: statistics.pstdev is exact, in fractions, and took 20 ms for 20,000.
            mean = sum(distances) / len(distances)
            spread = math.sqrt(max(0.0, sum(map(operator.mul, distances, distances)) /
                                   len(distances) - mean * mean)) or 1.0
            if (mean - distances[shortlist[0]]) / spread < self.STANDOUT:
                return []  # nothing the words found, and nothing stands out: off the subject
        chosen = [ids[at] for at in shortlist]
        rows = conn.execute(PASSAGES_WITH_VECTORS.format(ids=", ".join("?" * len(chosen))),
                            chosen).fetchall()
        norm = math.sqrt(sum(x * x for x in asked)) or 1.0
        asked = [x / norm for x in asked]
        found = sorted(([meaning_cosine(asked, vector), date, passage_id,
                         Passage(source_id, title, url, date, text)]
                        for passage_id, source_id, title, url, date, text, vector in rows),
                       key=lambda item: -item[0])
        return found[:self.MOST]


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


#: WeChat's XML is one <xml> of short fields; some events nest a few levels (WECHAT.md §8).
MAX_FIELDS = 64
MAX_DEPTH = 8
#: Byte-order marks: a push in UTF-16 or UTF-32 is refused, whatever it declares.
BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def parse_xml(body: bytes) -> dict[str, str]:
    """The fields of an <xml> push: each child's text; a child with children of its own is "",
    and its own children's texts are fields too, under their names, when no child of <xml>
    has the name (PUBLISHJOBFINISH's article_id is inside <PublishEventInfo>).

    UTF-8 only. The parser itself refuses a DOCTYPE or an entity declaration, so no entity is
    ever expanded (billion laughs, XXE), while markup quoted inside CDATA stays the user's text.
    """
    # Expat detects UTF-16 on its own; "<" in UTF-16 or UTF-32 always holds a NUL byte, and
    # NUL is never valid XML.
    if body.startswith(BOMS) or b"\x00" in body:
        raise BadPush("the body is not UTF-8 (a byte-order mark or a NUL byte)")
    fields: dict[str, str] = {}
    depth, text, nested = 0, [], False
    inner: list = []  # [name, texts] of the grandchild being read, while it has no children

    def declaration(version, encoding, standalone):
        if encoding and encoding.lower() not in ("utf-8", "utf8"):
            raise BadPush(f"the XML declares encoding {encoding[:20]!r}; WeChat sends UTF-8")

    def refuse_declaration(*args):
        raise BadPush("DOCTYPE and ENTITY declarations are not allowed")

    def start(tag, attributes):
        nonlocal depth, nested
        if depth == 0 and tag != "xml":
            raise BadPush(f"root element is <{tag[:20]}>, expected <xml>")
        if depth == MAX_DEPTH:
            raise BadPush("elements nested too deeply")
        if depth == 1:
            if len(fields) >= MAX_FIELDS and tag not in fields:
                raise BadPush("too many fields")
            text.clear()
            nested = False
        nested = nested or depth >= 2
        if depth == 2:
            inner[:] = [tag, []]
        elif depth > 2:
            inner.clear()
        depth += 1

    def end(tag):
        nonlocal depth
        depth -= 1
        if depth == 1:
            fields[tag] = "" if nested else "".join(text).strip()
        elif depth == 2 and inner:
            if len(fields) < MAX_FIELDS:
                fields.setdefault(inner[0], "".join(inner[1]).strip())
            inner.clear()

    def characters(data):
        if depth == 2:
            text.append(data)
        elif depth == 3 and inner:
            inner[1].append(data)

    parser = xml.parsers.expat.ParserCreate("utf-8")
    parser.buffer_text = True
    parser.XmlDeclHandler = declaration
    parser.StartDoctypeDeclHandler = refuse_declaration
    parser.EntityDeclHandler = refuse_declaration
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = characters
    try:
        parser.Parse(body, True)
    except xml.parsers.expat.ExpatError as error:
        raise BadPush(f"malformed XML: {xml.parsers.expat.ErrorString(error.code)}") from None
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


#: Temporary media: JPEG or PNG up to 10 MB, kept by WeChat for 3 days (WECHAT.md §8); an
#: upload older than MEDIA_LIFETIME is made again (an hour's margin for the send).
IMAGE_BYTES = 10 * 1024 * 1024
MEDIA_LIFETIME = 3 * 86400 - 3600


def image_type(data: bytes) -> str | None:
    """The format ("jpeg" or "png") by the file's first bytes; None for any other."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


class WeChatError(Exception):
    """WeChat answered with a non-zero errcode, or not at all (errcode None).

    `declined`: WeChat answered that it did not take the call (an errcode, an HTTP 4xx);
    otherwise (a 5xx, which a relay may answer after WeChat took it, a timeout, a connection
    broken off, a body that makes no sense) whether it took it is not known.
    """

    def __init__(self, errcode: int | None, errmsg: str, declined: bool | None = None):
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode, self.errmsg = errcode, errmsg
        self.declined = errcode is not None if declined is None else declined

    def ip(self) -> str | None:
        """The server IP WeChat names in a 40164 ("invalid ip 1.2.3.4 ..., not in whitelist")."""
        found = re.search(r"invalid ip ([0-9a-fA-F.:]+)", self.errmsg or "")
        return found.group(1) if found else None

    def hint(self) -> str:
        template = HINTS.get(self.errcode, "")
        if "{ip}" in template:
            template = template.format(ip=self.ip() or "see errmsg")
        return f"{self} — {template}" if template else str(self)


class WeChatConnections:
    """Kept-open connections to WeChat's API, for the JSON calls every answer makes.

    An answer makes four to six calls (typing, its renewal, one per segment), hundreds at
    once in a burst. requests spends some 0.9 ms of CPU on each, half of it reading the
    proxy settings from the environment again; http.client on a kept-open connection spends
    0.3 ms. Verified as requests verifies: its CA bundle, or REQUESTS_CA_BUNDLE.
    """

    #: Connections kept open between calls (as many as the threads that call WeChat at once,
    #: so that a burst does not open and close them); more are opened while more are in use.
    IDLE = 64
    #: A connection unused for longer is closed, not tried: WeChat's side, or a NAT between,
    #: may have dropped it without a word, and a call on it would wait out its timeout.
    IDLE_SECONDS = 30.0

    def __init__(self, base: str):
        parts = urllib.parse.urlsplit(base)
        https = parts.scheme == "https"
        self.host, self.prefix = parts.hostname, parts.path
        self.port = parts.port or (443 if https else 80)
        self.context = self.verifier() if https else None
        self._idle: list[tuple[float, http.client.HTTPConnection]] = []  # (since, connection)
        self._lock = threading.Lock()

    @staticmethod
    def verifier() -> ssl.SSLContext:
        """The TLS context: SettingsError when the certificates it names cannot be read."""
        setting = ("REQUESTS_CA_BUNDLE" if os.environ.get("REQUESTS_CA_BUNDLE") else
                   "CURL_CA_BUNDLE" if os.environ.get("CURL_CA_BUNDLE") else None)
        path = os.environ[setting] if setting else requests.certs.where()
        try:
            if os.path.isdir(path):  # a folder of certificates, as requests takes it too
                return ssl.create_default_context(capath=path)
            return ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as error:
            raise SettingsError([f"{setting or 'the CA bundle'} ({path}): cannot read "
                                 f"certificates from it ({error}); point it at a PEM file or "
                                 f"a folder of them, or unset it"]) from None

    @staticmethod
    def usable(base: str) -> bool:
        """False behind a proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) or with credentials in
        the URL: requests speaks to those."""
        return not (urllib.parse.urlsplit(base).username
                    or requests.utils.get_environ_proxies(base))

    def request(self, method: str, target: str, body: bytes | None, headers: dict,
                timeout: float, repeatable: bool) -> tuple[int, bytes]:
        """One call: its HTTP status and body. Raises OSError or http.client.HTTPException
        when WeChat cannot be reached or breaks off.

        A kept-open connection WeChat closed as it was taken fails the call before any answer;
        the call is then made once more on a new one if it cannot have been taken (the request
        was not all sent), or if taking it twice does no harm (`repeatable`; never a message
        sent to a user, which would show twice)."""
        for last in (False, True):
            connection, kept = self._take(timeout)
            sent = False
            try:
                try:
                    connection.request(method, self.prefix + target, body, headers)
                    sent = True
                    response = connection.getresponse()
                except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                    if kept and not last and (repeatable or not sent):
                        connection.close()
                        continue
                    raise
                data = response.read()
            except BaseException:
                connection.close()  # never reused half-way through a call
                raise
            self._give(connection, response.will_close)
            return response.status, data
        raise AssertionError("unreachable")

    def _take(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection, and whether it was kept open from an earlier call."""
        while True:
            with self._lock:
                since, connection = self._idle.pop() if self._idle else (0.0, None)
            if connection is None:
                break
            if time.monotonic() - since < self.IDLE_SECONDS and connection.sock is not None:
                # Readable while idle means WeChat closed it (or sent what nobody asked for).
                poller = select.poll()  # not select(): any descriptor number
                poller.register(connection.sock, select.POLLIN)
                if not poller.poll(0):
                    connection.sock.settimeout(timeout)
                    return connection, True
            connection.close()
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.context), False
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout), False

    def _give(self, connection: http.client.HTTPConnection, closing: bool) -> None:
        with self._lock:
            if not closing and len(self._idle) < self.IDLE:
                self._idle.append((time.monotonic(), connection))
                return
        connection.close()


class WeChatAPI:
    """Calls to WeChat's API with an access token cached in SQLite across restarts."""

    #: Refresh this long before WeChat says the token expires.
    REFRESH_AHEAD = 300.0
    #: "Typing" shows this long and cannot be shown again meanwhile (45081), unless a
    #: message to the user ends it first.
    TYPING_SHOWN = 15.0

    def __init__(self, settings: Settings, store: Store, timeout: float = 10.0):
        self.settings, self.store, self.timeout = settings, store, timeout
        self._typing_since: dict[str, float] = {}  # openid: when typing was shown
        self._typing_lock = threading.Lock()
        self._lock = threading.Lock()  # one token refresh at a time
        self._local = threading.local()
        self._reported: set[int] = set()
        self._reported_lock = threading.Lock()
        self._direct = (WeChatConnections(settings.api_base)
                        if WeChatConnections.usable(settings.api_base) else None)

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

    def _post(self, path: str, body: dict | None, params: dict | None = None,
               files: dict | None = None) -> dict:
        """POST JSON as raw UTF-8 (escapes can fail with 40033), or `files` as multipart, or
        GET when there is neither; raise WeChatError on failure."""
        if self._direct is not None and files is None:
            return self._answer(path, *self._call_direct(path, body, params))
        url = self.settings.api_base + path
        try:
            if files is not None:  # up to 10 MB: more time than a JSON call
                response = self._session().post(url, params=params, files=files,
                                                timeout=self.timeout * 6)
            elif body is None:
                response = self._session().get(url, params=params, timeout=self.timeout)
            else:
                response = self._session().post(
                    url, params=params, timeout=self.timeout,
                    data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                    headers={"Content-Type": "application/json; charset=utf-8"})
        except requests.RequestException as error:
            raise WeChatError(None, f"{type(error).__name__} calling {path}") from None
        return self._answer(path, response.status_code, response.content)

    def _call_direct(self, path: str, body: dict | None, params: dict | None
                     ) -> tuple[int, bytes]:
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        repeatable = path != "/cgi-bin/message/custom/send"  # a send taken twice shows twice
        try:
            if body is None:
                return self._direct.request("GET", target, None, {}, self.timeout, True)
            return self._direct.request(
                "POST", target, json.dumps(body, ensure_ascii=False).encode("utf-8"),
                {"Content-Type": "application/json; charset=utf-8"}, self.timeout, repeatable)
        except (OSError, ValueError, http.client.HTTPException) as error:
            why = f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else ""
            raise WeChatError(None, f"{type(error).__name__} calling {path}{why}") from None

    @staticmethod
    def _answer(path: str, status: int, content: bytes) -> dict:
        """WeChat's JSON answer; WeChatError for an HTTP error, a non-JSON body or an errcode."""
        if status != 200:
            # A 4xx: refused. A 5xx may come from a relay after WeChat took the call.
            raise WeChatError(None, f"HTTP {status} from {path}", declined=status < 500)
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise WeChatError(None, f"{path} answered something that is not a JSON object")
        errcode = answer.get("errcode", 0)
        if errcode:
            raise WeChatError(errcode, str(answer.get("errmsg", ""))[:200])
        return answer

    def access_token(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        token = self.store.get_kv("access_token", now + self.REFRESH_AHEAD)
        if token:
            SECRET_FILTER.add_access_token(token)
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
        SECRET_FILTER.add_access_token(token)
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

    def call(self, path: str, body: dict | None = None, params: dict | None = None,
             files: dict | None = None) -> dict:
        """An authenticated call (GET without a body); on 40001, 40014 or 42001 refresh the
        token once and retry once."""
        token = self._before_the_call(self.access_token)
        try:
            return self._post(path, body, {**(params or {}), "access_token": token}, files)
        except WeChatError as error:
            if error.errcode not in TOKEN_INVALID:
                raise
            log_wechat.warning("access token rejected (%s); refreshing once", error.errcode)
        # No declined here: the connection may have sent the call before WeChat refused the
        # token (a kept-open connection found closed sends it once more).
        return self._post(path, body, {**(params or {}), "access_token":
                                       self.refresh_token(token)}, files)

    @staticmethod
    def _before_the_call(get: Callable[[], str]) -> str:
        """The token for a call: when it cannot be had, the call was never made (declined:
        a message's next try is no repeat)."""
        try:
            return get()
        except WeChatError as error:
            error.declined = True
            raise

    def _typing_shown(self, openid: str, command: str) -> bool:
        """Whether typing still shows for `openid`; for "Typing", note that it shows from now
        unless it showed already (a message sent ends it: "sent", or "CancelTyping")."""
        now = time.monotonic()
        with self._typing_lock:
            shown = now - self._typing_since.get(openid, -math.inf) < self.TYPING_SHOWN
            if len(self._typing_since) >= 10000:  # the users of the last 15 s, no more
                self._typing_since = {user: since for user, since in self._typing_since.items()
                                      if now - since < self.TYPING_SHOWN}
            if command != "Typing":
                self._typing_since.pop(openid, None)
            elif not shown:
                self._typing_since[openid] = now
            return shown

    def customer_service_send(self, openid: str, text: str) -> None:
        self.call("/cgi-bin/message/custom/send",
                  {"touser": openid, "msgtype": "text", "text": {"content": text}})
        self._typing_shown(openid, "sent")

    def upload_image(self, data: bytes) -> str:
        """Upload a JPEG or PNG as temporary media (lives 3 days); its media_id."""
        kind = image_type(data)
        answer = self.call("/cgi-bin/media/upload", params={"type": "image"}, files={
            "media": (f"image.{kind}", data, f"image/{kind}")})
        media_id = answer.get("media_id")
        if not isinstance(media_id, str) or not media_id:
            raise WeChatError(None, "media/upload answered without media_id")
        return media_id

    def send_image(self, openid: str, media_id: str) -> None:
        self.call("/cgi-bin/message/custom/send",
                  {"touser": openid, "msgtype": "image", "image": {"media_id": media_id}})
        self._typing_shown(openid, "sent")

    def send_card(self, openid: str, card: dict) -> None:
        """An article's card (Card.message: mpnewsarticle or news)."""
        self.call("/cgi-bin/message/custom/send", {"touser": openid, **card})
        self._typing_shown(openid, "sent")

    def menu_create(self, menu: dict) -> None:
        """Replace the custom menu with exactly this one (sent as raw UTF-8, as every call)."""
        self.call("/cgi-bin/menu/create", menu)

    def menu_current(self) -> dict:
        """The menu in force, as get_current_selfmenu_info describes it."""
        return self.call("/cgi-bin/get_current_selfmenu_info")

    def menu_delete(self) -> None:
        self.call("/cgi-bin/menu/delete")

    def published(self, offset: int, count: int = 20) -> dict:
        """A page of the articles published with 发布, their content included (WECHAT.md §9)."""
        return self.call("/cgi-bin/freepublish/batchget",
                         {"offset": offset, "count": count, "no_content": 0})

    def published_article(self, article_id: str) -> dict:
        """One published post's articles (news_item), as WeChat pushed its article_id."""
        return self.call("/cgi-bin/freepublish/getarticle", {"article_id": article_id})

    def typing(self, openid: str, command: str = "Typing") -> None:
        """Show "typing"; every error is harmless (45080 too late, 45081 already shown).

        A user whose typing still shows gets no call: WeChat would refuse it (45081), and a
        user who sends ten messages in a second would cost ten calls.
        """
        # Noted before the call, so that a message sent meanwhile (which ends it) counts.
        if self._typing_shown(openid, command) and command == "Typing":
            return
        try:
            self.call("/cgi-bin/message/custom/typing", {"touser": openid, "command": command})
        except WeChatError as error:
            if command == "Typing":  # not shown: the next message may try again
                self._typing_shown(openid, "failed")
            log_wechat.debug("typing for %s not shown: %s", short_id(openid), error)


class DeliveryMode:
    """Whether answers go out through the customer-service API or as passive replies.

    Unverified accounts may not use the customer-service API (48001). With WXBOT_MODE=auto
    the first 48001 switches to passive replies, remembered in the database. A permission
    can come back (a verification renewed after 年审): the first message a day
    (RETRY_AFTER) after the last 48001 tries the customer-service API again, while its push
    waits for a passive reply as any other. If WeChat takes it, wxbot switches back; if not,
    the answer goes out in the reply and the next try is a day later.
    """

    RETRY_AFTER = 86400.0

    def __init__(self, setting: str, store: Store):
        self.setting, self.store = setting, store
        self.passive = setting == "passive" or (
            setting == "auto" and store.get_kv("mode", 0) == "passive")
        self.trial: int | None = None  # the message trying the customer-service API again
        self._lock = threading.Lock()

    @property
    def in_force(self) -> str:
        """For /stats and /healthz: "service" or "passive"."""
        return "passive" if self.passive else "service"

    def try_service(self, message_id: int, now: float) -> bool:
        """A new push in passive mode: whether its message tries the customer-service API
        again (auto mode, the first message a day after the last 48001)."""
        if self.setting != "auto" or not self.passive:
            return False
        if now - float(self.store.get_kv("passive-since", 0) or 0) < self.RETRY_AFTER:
            return False
        with self._lock:
            # A trial settled without sending anything (nothing to say) decided nothing.
            if self.trial is not None and not self.store.settled(self.trial):
                return False
            self.trial = message_id
        log_wechat.info("message %s tries the customer-service API again (a day after the "
                        "last 48001)", message_id)
        return True

    def sends(self, message_id: int) -> bool:
        """Whether the message's answer goes through the customer-service API."""
        return not self.passive or message_id == self.trial

    def service_works(self, message_id: int) -> None:
        """A customer-service message went through: a trial that did switches back."""
        with self._lock:
            if message_id != self.trial:
                return
            self.passive, self.trial = False, None
            self.store.set_kv("mode", "service", None)
        log_wechat.warning("WeChat takes customer-service messages again: switching back from "
                           "passive replies (WXBOT_MODE=auto)")

    def no_permission(self, message_id: int, now: float) -> bool:
        """WeChat said 48001; True when the message's answer now goes out passively."""
        if self.setting != "auto":
            return False
        with self._lock:
            trial, switched = message_id == self.trial, not self.passive
            if trial:
                self.trial = None
            self.passive = True
            self.store.set_kv("mode", "passive", None)
            self.store.set_kv("passive-since", str(now), None)
        if switched:
            log_wechat.warning("WeChat refuses the customer-service API (48001: the account is "
                               "not verified). Switching to passive replies (WXBOT_MODE=auto): "
                               "each answer now goes out in the reply to the user's message; "
                               "the API is tried again in a day.")
        elif trial:
            log_wechat.info("WeChat still refuses the customer-service API (48001): passive "
                            "replies for another day")
        return True


###############################################################################
# Model client ################################################################
###############################################################################

class ModelError(Exception):
    """The model gave no usable answer. kind: "transient" (try again later), "context" (the
    conversation is too long), "refused" (a content filter), "empty" (a finished answer with
    no text to use: asked again, it costs again and is as empty), "deadline"
    (WXBOT_MODEL_TIMEOUT passed: never asked again), or "fatal" (a setting is wrong).
    `failed` says what failed, in OUTAGE_SIGNS when it is the provider's and not the
    question's (Outage counts those), or "answer" for what the answer itself was."""

    def __init__(self, reason: str, kind: str = "transient", retry_after: float | None = None,
                 status: int | None = None, detail: str = "", failed: str = "answer"):
        super().__init__(reason)
        self.kind, self.retry_after, self.status, self.detail = kind, retry_after, status, detail
        self.failed = failed


#: What fails when the provider fails, whatever the question: no connection (refused, DNS,
#: a black hole), a connection on which no answer begins, a stream that stops part-way, its
#: 5xx, its rate limit (429). Metrics count model errors by these names (and "answer").
OUTAGE_SIGNS = ("no connection", "no first byte", "stalled stream", "provider error",
                "rate limited")
#: Seconds to open a connection to the model: a provider that is up connects in well under
#: one; a black-holed one is named as such this soon, not at WXBOT_MODEL_TIMEOUT.
CONNECT_SECONDS = 10.0


#: How providers say a request was too long, or blocked by their content filter (HTTP 400).
CONTEXT_TOO_LONG = re.compile(r"context.length|context_length|maximum context|too long|"
                              r"max_tokens|tokens? limit|超出|过长", re.I)
CONTENT_FILTER = re.compile(r"content.filter|content_filter|content management|"
                            r"data_inspection|inappropriate|sensitive|risk|违规|敏感|"
                            r"safety system|content.policy|moderation", re.I)


def stream_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """The lines of a byte stream; a line is decoded whole, so a character split across
    chunks is never cut."""
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if rest:
        yield rest.rstrip(b"\r").decode("utf-8")


@contextlib.contextmanager
def paced_reads(response, every: float) -> Iterator[None]:
    """Within it, the response is read from the network at most once every `every` seconds.

    Models send a token or a few characters at a time, each its own write and HTTP chunk;
    read as it comes, each costs a thread wake-up and some 0.1 ms of CPU. So the pause goes
    before each read of the network stream the HTTP client exposes: what the model sent
    meanwhile waits in the socket's buffer and comes in one read, and the client then hands
    out all of its chunks at once. (A pause between chunks instead would hold back chunks
    already received, one pause each, and read a fast model slower than it writes.)

    The pause ends early once the model has sent and gone quiet: the end of an answer (a
    short one is all end) is read when it comes, not up to `every` later.
    """
    stream = response.extensions.get("network_stream")
    read = getattr(stream, "read", None)
    if read is None:  # another transport: read as it comes
        yield
        return
    get_extra_info = getattr(stream, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info else None
    next_read = time.monotonic()

    def paced_read(*args, **kwargs):
        nonlocal next_read
        until_quiet(sock, next_read)
        try:
            return read(*args, **kwargs)
        finally:
            next_read = time.monotonic() + every

    stream.read = paced_read
    try:
        yield
    finally:  # the connection may serve the client's next request, unpaced; once the body
        # is read the client may already have handed it to another call, which paces it too
        if vars(stream).get("read") is paced_read:
            del stream.read


#: How often a paced read looks whether the model went quiet with bytes waiting.
QUIET_LOOK = 0.04


def until_quiet(sock: socket.socket | None, until: float) -> None:
    """Sleep until `until`, or less: until bytes wait on `sock` and no more came during a
    look's time (the sender paused or finished), or the TLS layer holds some already."""
    waiting = 0
    while (left := until - time.monotonic()) > 0:
        if sock is None:
            time.sleep(left)
            return
        try:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            # The kernel's count of bytes received and not read yet (ciphertext under TLS).
            now = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                 b"\0\0\0\0"))[0]
        except (OSError, ValueError):  # closed under it: the read says how
            return
        if now and now == waiting:
            return
        waiting = now
        time.sleep(min(left, QUIET_LOOK))


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON of each server-sent event in a stream of lines, up to `data: [DONE]`.

    An event is its `data:` lines joined, ended by a blank line; `event:`, `id:` and comment
    lines (`: keep-alive`) carry nothing an answer needs.
    """
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
            continue
        if line or not data:
            continue
        event, data = "\n".join(data), []
        if event.startswith("[DONE]"):
            return
        yield json.loads(event)
    if data and not data[0].startswith("[DONE]"):  # the last event, without its blank line
        yield json.loads("\n".join(data))


#: The SDK's HTTP response class (httpx's, or httpx2's from openai 3): asked for as the
#: result of `client.post`, it comes back unread, as the SDK's README shows for raw calls.
HTTPX = sys.modules[openai.DefaultHttpxClient.__base__.__module__.partition(".")[0]]
HTTP_RESPONSE = HTTPX.Response


def no_text(finish_reason: str | None, max_tokens: int) -> ModelError:
    """Why a finished answer has no text, as the operator can act on it."""
    if finish_reason == "content_filter":
        return ModelError("the provider's content filter stopped the answer", "refused")
    if finish_reason == "length":
        return ModelError(f"the model used all WXBOT_MAX_TOKENS ({max_tokens}) before writing "
                          f"any answer (a reasoning model spends them thinking): raise "
                          f"WXBOT_MAX_TOKENS", "empty")
    return ModelError(f"the model returned an empty answer (finish_reason {finish_reason})",
                      "empty")


class Deadline:
    """WXBOT_MODEL_TIMEOUT for a whole model call, kept by the thread that watches the call.

    The HTTP client's timeout bounds each read, not the call, and a model that keeps writing
    (even only keep-alives) never reaches it. So the watcher hangs up at the deadline: the
    socket of the response being read is shut down, which wakes a read blocked on it at once
    (closing a socket from another thread does not), and the model stops writing and billing.
    """

    def __init__(self, seconds: float):
        self.seconds, self.at = seconds, time.monotonic() + seconds
        self.hung_up = False
        self.responded = False  # an HTTP response came: what it said ran past the deadline
        self._response: HTTP_RESPONSE | None = None
        self._lock = threading.Lock()

    def error(self, begun: bool = True) -> ModelError:
        """What the deadline ended: an answer that had begun (a stalled stream, or a slow
        model), or none at all (no first byte: the provider took the call and said nothing).
        Either way the question is not asked again: it may have been billed."""
        if not begun:  # one question's: not asked again; an outage's when it is everyone's
            return ModelError(f"no first byte of an answer within WXBOT_MODEL_TIMEOUT "
                              f"({self.seconds:g} s): the provider took the request and said "
                              f"nothing; check its status page and any proxy in between",
                              "deadline", failed="no first byte")
        return ModelError(f"the answer stalled: not complete within WXBOT_MODEL_TIMEOUT "
                          f"({self.seconds:g} s); if answers often end so, the model writes "
                          f"slowly: raise it", "deadline", failed="stalled stream")

    def timeout(self) -> object:
        """The HTTP client's timeout for a request now: what is left of the deadline, and at
        most CONNECT_SECONDS of it to connect."""
        left = self.left()
        return HTTPX.Timeout(left, connect=min(left, CONNECT_SECONDS))

    def left(self) -> float:
        """Seconds left: each request's timeout, which bounds the wait for its response
        (before there is one to hang up on) and a request read whole by the SDK."""
        return max(0.0, self.at - time.monotonic())

    def reading(self, response: HTTP_RESPONSE | None) -> None:
        """The response now being read; None once it is closed, so that a hang-up never
        reaches its connection, which the client may be reusing for another call."""
        with self._lock:
            self._response = response
            self.responded = self.responded or response is not None
            if self.hung_up:
                self._shut()

    def hang_up(self) -> None:
        """End the call: the read in progress returns now, and nothing more is read."""
        with self._lock:
            self.hung_up = True
            self._shut()

    def _shut(self) -> None:
        stream = self._response and self._response.extensions.get("network_stream")
        sock = stream and stream.get_extra_info("socket")
        if sock is not None:  # TLS too: SSLSocket's own shutdown would drop the TLS state
            with contextlib.suppress(OSError):  # under the read, which then reads ciphertext
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Model:
    """An OpenAI-compatible chat.completions endpoint (OpenAI, DeepSeek, Qwen, Ollama, ...)."""

    #: The settings an operator fixes when the provider refuses (named in the log).
    KEY_SETTING, MODEL_SETTING, URL_SETTING = "OPENAI_API_KEY", "WXBOT_MODEL", "OPENAI_BASE_URL"
    #: Seconds between reads of a stream: WeChat only ever sees whole segments of hundreds
    #: of characters, so reading each token as it comes costs CPU and gains nothing. A read
    #: costs some 0.08 ms in all; a segment waits at most this long for the read that ends it.
    READ_EVERY = 0.5
    #: An answer in one piece (a provider that ignores stream=True) is read up to this many
    #: bytes: far above any WXBOT_MAX_TOKENS, far below what would fill a small server.
    MAX_WHOLE = 1 << 20
    #: Where the tokens a provider reports using are counted (Bot sets it).
    metrics: "Metrics | None" = None

    def _used(self, event: dict) -> None:
        """Count the tokens an answer (or its stream's last event) says it used, if it says."""
        usage = event.get("usage")
        if self.metrics and isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                tokens = usage.get(f"{kind}_tokens")
                if isinstance(tokens, int):
                    self.metrics.count("wxbot_model_tokens_total", kind, tokens)

    def __init__(self, settings: Settings):
        self.settings, self.name = settings, settings.model
        self.client = openai.OpenAI(api_key=settings.openai_api_key,
                                    base_url=settings.openai_base_url or None,
                                    timeout=settings.model_timeout, max_retries=0)
        self._search_words_failure = Failing()

    def answer(self, messages: list[dict], deadline: Deadline, max_tokens: int | None = None
               ) -> str:
        """The whole answer in one piece, not streamed. Read as a stream is: the body up to
        MAX_WHOLE bytes, and hung up on at the deadline. (The SDK's own call reads a body
        whole, however long, and no hang-up reaches it: an endless body filled the memory.)"""
        if deadline.hung_up:
            raise deadline.error()
        max_tokens = max_tokens or self.settings.max_tokens
        try:
            response = self.client.post("/chat/completions", cast_to=HTTP_RESPONSE, stream=True,
                                        body={"model": self.settings.model,
                                              "messages": messages, "max_tokens": max_tokens},
                                        options={"timeout": deadline.timeout()})
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise self._unreachable(error) from None
        return self._whole_body(response, deadline, max_tokens)

    #: The search words' call: beyond this, the question is searched with its own words.
    SEARCH_WORDS_TIMEOUT = 8.0
    #: After this many failed in a row, none is asked for SEARCH_WORDS_PAUSE seconds: each
    #: would cost a reader up to the timeout for nothing.
    SEARCH_WORDS_TRIES, SEARCH_WORDS_PAUSE = 3, 600.0
    _search_words_failures = 0
    _search_words_resume = 0.0

    def search_words(self, question: str, earlier: Sequence[str] = ()) -> str | None:
        """The words an article of the account would use to answer the question (what a
        reader calls 牙医 an article calls 口腔科), in one short call; None when the model
        says the question is about nothing an account writes of (small talk, general
        knowledge); "" when the call fails (logged once until it works again)."""
        if time.monotonic() < self._search_words_resume:
            return ""  # it failed again and again: the question's own words for a while
        try:
            written = self.answer([{"role": "system", "content": SEARCH_WORDS_PROMPT},
                                   {"role": "user", "content": search_words_asked(question,
                                                                                  earlier)}],
                                  Deadline(min(self.SEARCH_WORDS_TIMEOUT,
                                               self.settings.model_timeout)), max_tokens=60)
        except ModelError as error:
            if self._search_words_failure.turned(True):
                log_worker.warning("search words not written (%s): articles are searched with "
                                   "the question's own words%s", error, "; a reasoning model "
                                   "needs more than 60 tokens: set WXBOT_SEARCH_WORDS=0"
                                   if error.kind == "empty" else "")
            self._search_words_failures += 1
            if self._search_words_failures >= self.SEARCH_WORDS_TRIES:  # not one more call
                self._search_words_resume = time.monotonic() + self.SEARCH_WORDS_PAUSE
            return ""
        self._search_words_failure.turned(False)
        self._search_words_failures = 0
        return search_words_read(written)

    @staticmethod
    def _whole(completion: dict, max_tokens: int) -> str:
        """The text of a chat.completion answered in one piece."""
        choices = completion.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and \
            isinstance(choices[0], dict) else {}
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise no_text(choice.get("finish_reason"), max_tokens)
        return text

    def stream(self, messages: list[dict], deadline: Deadline) -> Iterator[str]:
        """The answer's text as the model writes it; one piece where streaming is not offered.

        The request goes through the client's own `post` (its base URL, auth, retries and
        error types stay) for the HTTP response unread, and the server-sent events are parsed
        here: the SDK's typed request takes some 3 ms of CPU and its objects 0.2 ms a chunk,
        where a burst streams hundreds of answers at once. `deadline` may hang up meanwhile.
        """
        if deadline.hung_up:  # a retry (without history) that comes too late
            raise deadline.error()
        try:
            response = self.client.post("/chat/completions", cast_to=HTTP_RESPONSE, stream=True,
                                        body={"model": self.settings.model,
                                              "messages": messages, "stream": True,
                                              "max_tokens": self.settings.max_tokens},
                                        options={"timeout": deadline.timeout()})
        except openai.APIStatusError as error:
            if error.status_code == 400 and "stream" in str(error.message).lower():
                yield self.answer(messages, deadline)
                return
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise self._unreachable(error) from None
        # A provider that ignores stream=True answers in one JSON body: not an event stream.
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            yield self._whole_body(response, deadline)
            return
        streamed = content_type.startswith("text/event-stream")
        produced, finish = False, None
        deadline.reading(response)
        try:
            with contextlib.closing(response) as http, paced_reads(http, self.READ_EVERY):
                for chunk in sse_events(stream_lines(http.iter_bytes())):
                    streamed = True
                    self._used(chunk)
                    problem = chunk.get("error")
                    if problem:  # some providers report a failure inside the stream
                        detail = str(problem.get("message", problem) if isinstance(
                            problem, dict) else problem)[:300]
                        raise ModelError("the model reported an error in the stream",
                                         "refused" if CONTENT_FILTER.search(detail)
                                         else "transient", detail=detail)
                    choices = chunk.get("choices")
                    choice = choices[0] if choices else None
                    if not isinstance(choice, dict):
                        continue
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        produced = produced or not text.isspace()
                        yield text
                    reason = choice.get("finish_reason")
                    if reason == "content_filter":
                        raise no_text(reason, self.settings.max_tokens)
                    finish = reason or finish
        except ModelError:
            raise
        except Exception as error:  # the stream broke off: network, timeout, bad chunk
            raise ModelError(f"the answer stream broke off ({type(error).__name__})",
                             failed="stalled stream") from None
        finally:
            deadline.reading(None)
        if deadline.hung_up:  # the watcher gave up on this call: nothing more is asked
            raise deadline.error()
        if not streamed:  # a provider that ignored stream=True: one JSON body, no event
            yield self.answer(messages, deadline)
        elif not produced:  # finished, or ended, with nothing to say: asking again costs
            raise no_text(finish, self.settings.max_tokens)
        elif not finish:  # the connection ended without the model saying it was done
            raise ModelError("the answer stream ended before the answer was finished",
                             failed="stalled stream")

    def _whole_body(self, response, deadline: Deadline, max_tokens: int | None = None) -> str:
        """An answer in one JSON body (a provider that ignored stream=True: already paid for,
        read here)."""
        deadline.reading(response)
        body = bytearray()
        try:
            with contextlib.closing(response) as http:
                for chunk in http.iter_bytes():
                    body += chunk
                    if len(body) > self.MAX_WHOLE:
                        raise ModelError(f"the provider's answer is over {self.MAX_WHOLE} "
                                         f"bytes: not a chat answer", "empty")
            completion = json.loads(body)
        except ModelError:
            raise
        except Exception as error:  # broken off, or not JSON after all
            raise ModelError(f"the answer broke off or is not JSON ({type(error).__name__})"
                             ) from None
        finally:
            deadline.reading(None)
        if deadline.hung_up:
            raise deadline.error()
        if not isinstance(completion, dict):
            raise ModelError("the answer is not a chat.completion")
        self._used(completion)
        return self._whole(completion, max_tokens or self.settings.max_tokens)

    def _unreachable(self, error: openai.APIError, what: str = "the model") -> ModelError:
        """No answer at all: no connection, or one on which nothing came back. The URL's
        credentials are masked here, not only in the log: the reason is also stored with the
        message, and `status` prints it."""
        cause, where = error.__cause__, masked_url(str(self.client.base_url))
        if isinstance(cause, (HTTPX.ConnectError, HTTPX.ConnectTimeout)):
            return ModelError(f"no connection to {what} at {where} ({type(cause).__name__}: "
                              f"refused, unresolved or unanswered); check {self.URL_SETTING}, "
                              f"DNS, the firewall and the provider's status page",
                              failed="no connection")
        return ModelError(f"no answer from {what} at {where} ({type(cause or error).__name__}"
                          f"): connected, but nothing came back; check the provider's status "
                          f"page and any proxy in between", failed="no first byte")

    def _status_error(self, error: openai.APIStatusError) -> ModelError:
        status = error.status_code
        hint = {401: f"check {self.KEY_SETTING}",
                403: f"check {self.KEY_SETTING} and the account",
                404: f"check {self.MODEL_SETTING} ({self.name}) and {self.URL_SETTING}"}
        retry_after = None
        with contextlib.suppress(TypeError, ValueError):
            retry_after = float(error.response.headers.get("retry-after"))
        detail = str(getattr(error, "message", "") or "")[:300]
        kind = "transient" if status in (408, 409, 429) or status >= 500 else "fatal"
        if status == 400 and CONTEXT_TOO_LONG.search(detail):
            kind = "context"
        elif status == 400 and CONTENT_FILTER.search(detail):
            kind = "refused"
        failed = "rate limited" if status == 429 else "provider error" if status >= 500 \
            else "answer"
        return ModelError(f"HTTP {status} from the model: {hint.get(status, 'provider error')}"
                          f" ({kind})", kind, retry_after, status, detail, failed)


class ImageModel(Model):
    """An OpenAI-compatible Images API (images.generate): WXBOT_IMAGE_BASE_URL with its key,
    or the chat provider's. Drawing takes longer than writing: twice WXBOT_MODEL_TIMEOUT."""

    KEY_SETTING = "WXBOT_IMAGE_API_KEY (or OPENAI_API_KEY)"
    MODEL_SETTING = "WXBOT_IMAGE_MODEL"
    URL_SETTING = "WXBOT_IMAGE_BASE_URL (or OPENAI_BASE_URL)"

    def __init__(self, settings: Settings):
        self.settings, self.name = settings, settings.image_model
        self.client = openai.OpenAI(
            api_key=settings.image_api_key or settings.openai_api_key,
            base_url=settings.image_base_url or settings.openai_base_url or None,
            timeout=settings.model_timeout * 2, max_retries=0)

    def draw(self, prompt: str) -> bytes:
        """The picture's bytes, whether the provider returns them (b64_json) or a link (url);
        ModelError "refused" when its safety system declines the prompt."""
        try:
            result = self.client.images.generate(model=self.name, prompt=prompt, n=1)
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APIError as error:
            raise self._unreachable(error, "the Images API") from None
        picture = result.data[0] if result.data else None
        if picture is not None and picture.b64_json:
            try:
                return base64.b64decode(picture.b64_json, validate=True)
            except ValueError:
                raise ModelError("the Images API returned b64_json that is not base64") \
                    from None
        if picture is not None and picture.url:
            return self._download(picture.url)
        raise ModelError("the Images API returned no image")

    def _download(self, url: str) -> bytes:
        """The picture behind the provider's link, read up to one byte over WeChat's limit."""
        try:
            with requests.get(url, stream=True, timeout=self.settings.model_timeout) as response:
                if response.status_code != 200:
                    raise ModelError(f"HTTP {response.status_code} fetching the image the "
                                     f"Images API linked to")
                data = response.raw.read(IMAGE_BYTES + 1, decode_content=True)
        except requests.RequestException as error:
            raise ModelError(f"{type(error).__name__} fetching the image the Images API "
                             f"linked to") from None
        return data


###############################################################################
# Reply shaping: segments #####################################################
###############################################################################

#: WeChat's practical limit for one customer-service text (45002 above it).
SEGMENT_BYTES = 2048
#: Customer-service messages allowed per user message within 48 h (45047).
QUOTA = 5
#: A follow, a menu click or a QR scan allows 3 messages within a minute (WECHAT.md §4).
EVENT_QUOTA = 3
#: Every segment leaves room for the "继续" line, which the 5th gets when more follows.
#: (The tappable line goes where it fits, which is most places; room for it in every segment
#: would leave too little for five to hold 3,000 Chinese characters.)
SEGMENT_LIMIT = SEGMENT_BYTES - len(TYPED_TAIL.encode("utf-8"))
#: The segment that closes a batch (the 5th of an answer, the 10th...; every one in a passive
#: reply) keeps room for the tappable line: that is where it goes. Its answer id is counted
#: at 20 digits, its count at 3.
CLOSING_LIMIT = SEGMENT_BYTES - max(
    len(tail.format(remaining=999, link=CONTINUE_LINK.format(answer="9" * 20)).encode("utf-8"))
    for tail in (CONTINUE_TAIL, MORE_TAIL, NEXT_TAIL))
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
#: In HTML, "<" opens markup only right before a letter, "/", "!" or "?" (a tag, an end tag, a
#: comment or declaration, a processing instruction); anywhere else it is text. WeChat renders
#: <a> in a text as a link the account sent (a mini-program, a fake menu choice), so where the
#: model wrote such a "<", code included (WeChat shows code as any text), it becomes the
#: full-width "＜": the user reads the same character and a prompt injection plants no link,
#: while "1 < 2" and "a <= b" stay as written.
MARKUP_OPEN = re.compile(r"<(?=[A-Za-z/!?])")
#: A link in a text as WeChat shows it: never cut across two segments. (No "<" inside: the
#: model's are MARKUP_OPEN's "＜" by now; and so a text of "<a " repeated is linear.)
ANCHOR = re.compile(r"<a\s[^<>]*>[^<]*</a>")
#: A Markdown link whose <a> would be longer stays text: a link must fit one segment whole.
LINK_MOST = 1024
#: A line being written is cut at a sentence end each time it grows by this many characters:
#: a paragraph longer than a segment must not hold the segments back until it ends.
LONG_LINE = 100
#: What must be balanced before a sentence end for a line to be cut there: inline code,
#: bold, links (counted, and for [] and () where the last of each is).
MARKS = ("`", "**", "[", "]", "(", ")")
#: A line just begun: counted up to 0, ends looked for from 0, no marks, none last anywhere.
NOTHING_COUNTED = (0, 0, (0,) * len(MARKS), (-1,) * 4)


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
    A link (ANCHOR) is never split.
    `early`: the text goes on beyond what is here, so only a real end will do, else None.
    """
    least = min(least, limit * 9 // 10)  # a smaller limit than WeChat's: still a natural end
    end = _chars_within(text, limit)
    low = _chars_within(text, least - 1) + 1
    # Only blocks that start before the cut matter: a place is not checked against them all.
    blocks = [(start, stop) for start, stop in blocks if start < end]
    long_blocks = []
    for start, stop in blocks:
        if start < end < stop:  # the cut would split this block
            if utf8_len(text[start:stop]) <= limit and text[:start].strip():
                return start
            long_blocks.append((start, stop))

    links = []  # those that start before the cut: not every link of a long text each time
    for match in ANCHOR.finditer(text):
        if match.start() >= end:
            break
        links.append(match.span())

    def allowed(at: int, line_end: bool) -> bool:
        if any(start < at < stop for start, stop in links):
            return False
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
    starts = [start for start, stop in links if start < end < stop and text[:start].strip()]
    return starts[0] if starts else end


def continue_tail(remaining: int | None, answer_id: str, text: str) -> str:
    """The line that ends `text` when more follows, with 继续 to tap (`answer_id`:
    Store.continue_id): how many segments of its answer remain (0: not known yet); None: its
    answer is whole, and 继续 brings the answer to a later question. Where that does not fit
    WeChat's 2048 bytes, the line that asks to type 继续."""
    link = CONTINUE_LINK.format(answer=answer_id)
    tail = NEXT_TAIL.format(link=link) if remaining is None else \
        CONTINUE_TAIL.format(remaining=remaining, link=link) if remaining else \
        MORE_TAIL.format(link=link)
    return tail if utf8_len(text + tail) <= SEGMENT_BYTES else TYPED_TAIL


def next_send(rows: list, quota: int, streaming: bool, answer_id: str
              ) -> tuple[sqlite3.Row, str] | None:
    """The segment of an answer to send next and its text (`answer_id` as its 继续 link names
    it: Store.continue_id); None when none may go now.

    WeChat allows `quota` customer-service messages for one user message (45047; Store.quota):
    the last one allowed says how to get the rest ("继续"), so while the model still writes,
    it waits until it is known whether more follows, and how much.
    """
    sent = sum(row["sent_at"] is not None for row in rows)
    if sent >= quota or (streaming and sent == quota - 1):
        return None
    for at, row in enumerate(rows):
        if row["sent_at"] is None:
            # A card follows its answer's text only where a message is free for it: no 继续.
            rest = [later["answer"] == row["answer"] for later in rows[at + 1:]
                    if not later["card"]]
            tail = continue_tail(sum(rest) if rest[0] else None, answer_id, row["content"]) \
                if sent == quota - 1 and rest else ""
            return row, row["content"] + tail
    return None


def anchor_tag(url: str) -> str:
    """The <a> that opens a link to url, which can end neither the attribute nor the tag."""
    return '<a href="{}">'.format(url.replace('"', "%22").replace("<", "%3C")
                                  .replace(">", "%3E"))


def _substitute(line: str, matches: Iterable[tuple[int, int, tuple[str, ...]]],
                replace: Callable[..., str]) -> str:
    """`line` with each match (start, end, groups), in order and apart, replaced by
    replace(*groups): what re.sub does, for the scanners below."""
    parts, at = [], 0
    for start, end, groups in matches:
        parts += [line[at:start], replace(*groups)]
        at = end
    parts.append(line[at:])
    return "".join(parts)


#: A run of backticks, which opens or closes inline code.
BACKTICKS = re.compile("`+")
#: The address of a Markdown link: up to a space or ")".
LINK_ADDRESS = re.compile(r"[^)\s]*")


def code_spans(line: str) -> Iterator[tuple[int, int, tuple[str, str]]]:
    """Inline code, each as (start, end, (marks, code)): a run of backticks, at least one
    character, and the first as many backticks; a run too long to be closed is tried shorter,
    down to one backtick (what the pattern "(`+)(.+?)" and the marks again would find).
    Found from the runs, in linear time: that pattern scans to the end of the line for each
    shorter run, cubic on a line of backticks."""
    runs = [match.span() for match in BACKTICKS.finditer(line)]
    longest_after = [0] * (len(runs) + 1)  # the longest run among runs[i:]
    for i in range(len(runs) - 1, -1, -1):
        longest_after[i] = max(longest_after[i + 1], runs[i][1] - runs[i][0])
    i, at = 0, 0  # runs[i] holds or follows `at`
    while i < len(runs):
        start = max(at, runs[i][0])
        if start >= runs[i][1]:
            i += 1
            continue
        length = runs[i][1] - start
        closed_within = (length - 1) // 2  # the longest marks the rest of this run closes
        closed_later = min(length, longest_after[i + 1])
        marks = max(closed_within, closed_later)
        if not marks:
            at = start + 1
            continue
        if closed_within >= closed_later:
            close = start + marks + 1
        else:
            i += 1
            while runs[i][1] - runs[i][0] < marks:
                i += 1
            close = runs[i][0]
        yield start, close + marks, (line[start:start + marks], line[start + marks:close])
        at = close + marks


def bracket_links(line: str, image: bool = False) -> Iterator[tuple[int, int, tuple[str, str]]]:
    """Markdown links [text](address "title"), each as (start, end, (text, address)); with
    `image`, images ![text](address) (their text may be empty). The address ends at a space
    or ")"; a title may follow it up to the ")".

    Scanned, in linear time: a pattern tried from each "[" scans on to the end of the line
    when no ")" comes, cubic on "[a](" repeated. Every "[" before a "]" meets that "]" and
    what follows it alike, so a "]" that fails one fails them all; a ")" missing after one
    address is missing after all the later ones."""
    opening = "![" if image else "["
    at = 0
    while (start := line.find(opening, at)) >= 0:
        if not image and start and line[start - 1] == "!":
            at = start + 1
            continue
        text = start + len(opening)
        close = line.find("]", text)
        if close < 0:
            return
        at = close + 1
        if (image or close > text) and line.startswith("(", close + 1):
            address = LINK_ADDRESS.match(line, close + 2).end()
            end = line.find(")", address)
            if end < 0:
                return
            if address > close + 2:
                yield start, end + 1, (line[text:close], line[close + 2:address])
                at = end + 1


class Paired:
    """Text between two marks, as OPENING(.+?)CLOSING finds it (the first closing mark after at
    least one character), the marks taken away. A closing mark does not depend on where its
    opening was: one search for it from each opening keeps this linear, where the expression
    scans to the end of the line from every opening mark that is never closed."""

    def __init__(self, opening: str, closing: str):
        self.opening, self.closing = re.compile(opening), re.compile(closing)

    def __call__(self, line: str) -> str:
        parts, at = [], 0
        while opening := self.opening.search(line, at):
            closing = self.closing.search(line, opening.end() + 1)
            if not closing:
                break
            parts += [line[at:opening.start()], line[opening.end():closing.start()]]
            at = closing.end()
        return "".join(parts) + line[at:]


#: A heading's marks; what follows is its text, less the spaces and #s that end it.
HEADING = re.compile(r"(\s*)#{1,6}\s+")


def heading(line: str) -> str:
    """A heading as its text, indentation kept. Its end is scanned from the right: a pattern
    for the spaces and #s at the end is tried from every character, quadratic on a heading
    of many spaces and then a letter."""
    match = HEADING.match(line)
    if not match:
        return line
    end = len(line)
    while end > match.end() and (line[end - 1].isspace() or line[end - 1] == "#"):
        end -= 1
    return match.group(1) + line[match.end():end]


class Markdown:
    """Turns a model's Markdown into plain text, one line at a time, since WeChat shows the
    marks as they are. Markup the model wrote is shown as text (MARKUP_OPEN); its http(s)
    links become <a> links, which WeChat shows. Code (inline and fenced) is taken out before
    any rule runs and put back as written. Only links make a line longer.

    A model can be made to write anything, a line of "[a](" or of spaces included, so every
    rule takes time linear in the line: no pattern here has two unbounded parts that can
    match the same characters, and a mark that may be closed far away is found by scanning
    (code_spans, bracket_links, Paired), never by backtracking."""

    TABLE_RULE = re.compile(r"\s*(?:\|\s*)?:?-{3,}:?(?:\s*\|\s*:?-{3,}:?)*\s*(?:\|\s*)?$")
    WEB = re.compile(r"https?://", re.I)
    #: Inline code waits in the Private Use Area while the rules run.
    PLACEHOLDER = re.compile("[\ue000-\uf8ff]")
    LINE_RULES = [
        heading,
        functools.partial(re.compile(r"^(\s*)[*+](\s+)").sub, r"\1-\2"),    # bullets
        functools.partial(re.compile(r"^\s*>\s?").sub, ""),                  # quotes
    ]
    # Emphasis never inside ASCII words: snake_case_names, 2*3*4 and 2**10 stay as written.
    # Underscores mark emphasis only around Chinese (_强调_): __init__, _a and b_ are code.
    RULES = [
        lambda line: _substitute(line, bracket_links(line, image=True), "{} {}".format),
        Paired(r"(?<![A-Za-z0-9*])\*\*(?=\S)", r"(?<=\S)\*\*(?![A-Za-z0-9*])"),
        Paired(r"(?<![A-Za-z0-9_])__(?=[^\x00-\x7f])", r"(?<=[^\x00-\x7f])__(?![A-Za-z0-9_])"),
        Paired(r"(?<![A-Za-z0-9*])\*(?=[^\s*])", r"(?<=[^\s*])\*(?![A-Za-z0-9*])"),
        Paired(r"(?<![A-Za-z0-9_])_(?=[^\x00-\x7f])", r"(?<=[^\x00-\x7f])_(?![A-Za-z0-9_])"),
        Paired(r"~~(?=\S)", r"(?<=\S)~~"),                                     # strike-through
    ]

    #: A line of the model's that begins as wxbot's 来源 line does (SOURCES_HEAD). Its links
    #: are shown as their text alone and its addresses dropped: only wxbot's own 来源 line
    #: links to articles, and a page learned may ask the model to write one to its own site.
    SOURCES_LIKE = re.compile(r"[\s>#*_~`|+-]*(?:\[\s*)?来\s*源")
    ADDRESS = re.compile(r"(?:https?://|www\.)[^\s<>\"'，。；）)\]]*", re.I)

    def __init__(self):
        self.in_code = False
        self.fence = ""  # the character of the fence the code in hand opened with: ` or ~
        self.sources_like = False  # the line in hand begins as a 来源 line

    def line(self, raw: str, line_start: bool = True) -> str | None:
        """One line as plain text; None for a line that goes (a code fence, a table rule).
        `line_start`: False for the rest of a line whose beginning was taken already."""
        fence = CODE_FENCE.match(raw) if line_start else None
        # Code opened with ``` is closed by ``` only: a line of ~~~ in it is code (CommonMark).
        if fence and (not self.in_code or fence.group(1)[0] == self.fence):
            self.in_code, self.fence = not self.in_code, fence.group(1)[0]
            return None
        raw = MARKUP_OPEN.sub("＜", raw)
        # Code stays as written, indentation and all; a blank line has nothing to clean.
        if self.in_code or not raw.strip():
            return raw
        if line_start and "|" in raw and self.TABLE_RULE.match(raw):
            return None
        if line_start:
            self.sources_like = bool(self.SOURCES_LIKE.match(raw))
        tags: set[int] = set()  # where in `kept` our own link tags are
        if self.sources_like:
            kept, line = [], self.ADDRESS.sub("", _substitute(raw, bracket_links(raw),
                                                              lambda text, url: text))
        elif self.PLACEHOLDER.search(raw):  # nowhere to park inline code nor links: as it is
            kept, line = [], _substitute(raw, bracket_links(raw), "{} ({})".format)
        else:
            spans = list(code_spans(raw))
            kept = [code for _, _, (_, code) in spans]
            places = iter(range(len(kept)))
            line = _substitute(raw, spans, lambda marks, code: chr(0xE000 + next(places)))
            line = _substitute(line, bracket_links(line),
                               lambda text, url: self._link(text, url, kept, tags))
        if line_start:
            stripped = line.strip()
            if len(stripped) > 1 and stripped[0] == "|" and stripped[-1] == "|":
                line = " | ".join(cell.strip() for cell in stripped[1:-1].split("|"))
            for rule in self.LINE_RULES:
                line = rule(line)
        for rule in self.RULES:
            line = rule(line)
        # The rules may have joined "<" to a name ("<**a**" became "<a"), and so may code put
        # back ("<`a`"): look for markup once more, with only our own link tags still parked.
        if kept:
            line = self.PLACEHOLDER.sub(lambda match: match.group() if ord(match.group())
                                        - 0xE000 in tags else kept[ord(match.group()) - 0xE000],
                                        line)
        line = MARKUP_OPEN.sub("＜", line)
        return self.PLACEHOLDER.sub(lambda match: kept[ord(match.group()) - 0xE000], line) \
            if tags else line

    def _link(self, text: str, url: str, kept: list[str], tags: set[int]) -> str:
        """A Markdown link: an http(s) one as <a>, its tags parked in `kept` so that no rule
        touches the address (its text still reads as any text); any other as text (address)."""
        tag = anchor_tag(url)
        if not self.WEB.match(url) or utf8_len(tag + text + "</a>") > LINK_MOST:
            return f"{text} ({url})"
        kept += [tag, "</a>"]
        tags.update((len(kept) - 2, len(kept) - 1))
        return chr(0xE000 + len(kept) - 2) + text.replace("<", "＜").replace(">", "＞") + \
            chr(0xE000 + len(kept) - 1)


class StreamCutter:
    """Cuts an answer into plain-text segments while the model is still writing it.

    Lines are turned into plain text as they complete (a long one at its sentence ends), so
    that segments are measured as the user gets them. The first segment goes out at the first
    paragraph, line or sentence end past FIRST_LEAST bytes; later ones once the limit is
    reached, as full as the text allows (_cut).
    """

    def __init__(self, first_done: bool = False, limit: int = SEGMENT_LIMIT,
                 markdown: bool = True, closing: Callable[[int], bool] = lambda n: False):
        self.first_done, self.limit = first_done, limit
        self.closing = closing   # whether the nth segment cut from here closes a batch
        self.cut = 0             # segments cut so far
        self.markdown = Markdown() if markdown else None  # None: text the owner wrote
        self.line = ""           # the raw line being written
        self.line_start = True   # False once the start of self.line has been taken
        self.looked = 0          # how long self.line was when last looked at for a cut
        self.counted = NOTHING_COUNTED  # marks in self.line up to a sentence end (_sentence_end)
        self.plain = ""          # plain text not cut into segments yet
        self.blocks: list[list[int | None]] = []  # code blocks in self.plain: [start, end]

    def feed(self, text: str) -> list[str]:
        """Take more of the answer; return the segments that are ready."""
        taken = "\n" in text
        if taken:
            *lines, self.line = (self.line + text).split("\n")
            for line in lines:
                self._take(line, whole=True)
            self.looked, self.counted = 0, NOTHING_COUNTED
        else:
            self.line += text
        if len(self.line) >= self.looked + LONG_LINE and not self.in_code:
            self.looked = len(self.line)
            at = self._sentence_end()
            if at:
                self._take(self.line[:at], whole=False)
                self.line = self.line[at:]
                self.looked, self.counted, taken = 0, NOTHING_COUNTED, True
        return self._segments(final=False) if taken else []  # nothing new to cut

    def finish(self, tail: str = "") -> list[str]:
        """The rest, once the model has finished. `tail`: plain text that ends the answer as
        it is, after a blank line (the 来源 line, whose links are wxbot's own, not markup)."""
        if self.line:
            self._take(self.line, whole=True)
            self.line = ""
        if self.blocks and self.blocks[-1][1] is None:  # a code block never closed
            self.blocks[-1][1] = len(self.plain.rstrip("\n"))
        if tail:
            self.plain = self.plain.rstrip("\n") + "\n\n" + tail if self.plain.strip() else tail
        return self._segments(final=True)

    @property
    def in_code(self) -> bool:
        return bool(self.markdown and self.markdown.in_code)

    def _sentence_end(self) -> int | None:
        """The last sentence end of the line being written where no inline code, emphasis or
        link is open, so that both parts read the same as the whole. (A "<" that opens
        markup is never last in a part, so each part shows it as text.)

        Each look goes on from where the last left off (self.counted: the marks counted up
        to a sentence end, and how far ends were looked for), not from the start of the line:
        a long line with a "[" never closed would otherwise be searched and counted whole
        every LONG_LINE characters."""
        line = self.line
        at, looked, counts, lasts = self.counted
        counts, lasts = list(counts), list(lasts)
        looked_next = len(line) - 1  # an end may still start at the last character (". ")
        found = None
        for match in SENTENCE_END.finditer(line, max(at, looked)):
            end = match.end()
            if end == len(line):  # it may grow ("。" then "」"): looked at again next time
                looked_next = match.start()
            for i, mark in enumerate(MARKS):  # no end is a "*": no "**" spans two counts
                counts[i] += line.count(mark, at, end)
            for i, mark in enumerate("[]()"):
                lasts[i] = max(lasts[i], line.rfind(mark, at, end))
            at = end
            if end < len(line):
                self.counted = at, at, tuple(counts), tuple(lasts)
            ticks, stars, opened, closed, opened_round, closed_round = counts
            if ticks % 2 == 0 and stars % 2 == 0 and opened == closed and \
                    opened_round == closed_round and lasts[0] <= lasts[1] and lasts[2] <= lasts[3]:
                found = end
        at, _, counts, lasts = self.counted
        self.counted = at, max(at, looked_next), counts, lasts
        return found

    def _take(self, raw: str, whole: bool) -> None:
        was_code = self.in_code
        plain = self.markdown.line(raw, self.line_start) if self.markdown else raw
        self.line_start = whole
        if plain is None:
            if self.in_code and not was_code:
                self.blocks.append([len(self.plain), None])
            elif was_code and not self.in_code:
                self.blocks[-1][1] = max(self.blocks[-1][0], len(self.plain) - 1)
            return
        if whole and not plain.strip() and not self.in_code and \
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
                at = len(self.plain)  # the last segment: no 继续 line, no room kept for it
            elif not self.first_done and size < FIRST_LEAST and not final:
                break
            else:
                least = SEGMENT_LEAST if self.first_done else FIRST_LEAST
                limit = min(self.limit, CLOSING_LIMIT) if self.closing(self.cut) else self.limit
                at = _cut(self.plain, limit, least, blocks, early=size <= self.limit)
                if at is None:
                    break
            ready.append(self.plain[:at].rstrip())
            self.cut += bool(ready[-1])
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


def split_segments(text: str, limit: int = SEGMENT_LIMIT, markdown: bool = True) -> list[str]:
    """A whole answer as plain-text segments of at most limit UTF-8 bytes (see _cut).
    `markdown`: False for text the owner wrote, sent as written (links and all), only cut."""
    cutter = StreamCutter(first_done=True, limit=limit, markdown=markdown)
    return cutter.feed(text) + cutter.finish()


###############################################################################
# Citing articles: passages for the model, links for the reader ###############
###############################################################################

#: Added to the owner's WXBOT_SYSTEM_PROMPT when passages of the account's articles go with a
#: question (and only then: a question no article covers costs no token more).
ARTICLES_PROMPT = (
    "用户的问题前附有本公众号文章的段落，每段以编号、标题和日期开头，如 [1] 《标题》 (2025-08-01)。"
    "这些段落能回答问题时，请依据它们回答，并在用到的内容后标上段落的编号，如 [1] 或 [1][2]；"
    "它们回答不了问题时，请说明公众号的文章里没有提到，不要编造。"
    "两篇文章说法不一致时，以日期较新的为准，可以说明以前的说法已经更新。"
    "不要自己写出处、标题或链接：回答末尾会附上所引文章的链接。"
)
#: Asked of the model when a question's own words meet no article well (Model.search_words).
NOT_ABOUT_THE_ACCOUNT = "无关"
SEARCH_WORDS_PROMPT = (
    "你帮一个微信公众号在它的文章里找答案。读者的问题往往用口语、别称或错别字，文章用的是正式说法。"
    "请写出文章里回答这个问题时很可能出现的3到6个词语（正式名称、同义词、相关说法），只写词语，用空格"
    f"分隔，不要解释。如果问题是闲聊或与任何公众号的文章都无关的常识问题，只写：{NOT_ABOUT_THE_ACCOUNT}"
)


def search_words_asked(question: str, earlier: Sequence[str] = ()) -> str:
    """What the model is asked for search words (after SEARCH_WORDS_PROMPT): the question,
    after the earlier one when there is one."""
    return "\n".join([*(f"（之前问过：{line[:200]}）" for line in list(earlier)[-1:]),
                      question[:500]])


def search_words_read(written: str) -> str | None:
    """The search words in the model's reply (its first line), or None for 无关."""
    words = written.strip().splitlines()[0][:200] if written.strip() else ""
    # 无关, “无关”, **无关**, 无关（闲聊）: the model's word for small talk, however dressed.
    return None if (re.findall(r"\w+", words)[:1] or [""])[0] == NOT_ABOUT_THE_ACCOUNT \
        else words


PASSAGES_HEAD = "公众号文章中的相关段落："
QUESTION_HEAD = "用户的问题："
SOURCES_HEAD = "来源："
#: The answer links to at most this many articles: the ones it cited first.
MOST_SOURCES = 3


def passage_heading(number: int, passage: Passage) -> str:
    """`[1] 《标题》 (2025-08-01)`: how a passage is headed for the model."""
    date = f" ({passage.date})" if passage.date else ""
    return f"[{number}] 《{passage.title.strip('《》 ')}》{date}"


def with_passages(question: str, passages: list[Passage]) -> str:
    """The question as the model gets it: the passages first, numbered, then the question;
    the question alone when no passage goes with it."""
    if not passages:
        return question
    numbered = "\n\n".join(f"{passage_heading(number, passage)}\n{passage.text.strip()}"
                           for number, passage in enumerate(passages, 1))
    return f"{PASSAGES_HEAD}\n\n{numbered}\n\n{QUESTION_HEAD}{question}"


def source_link(passage: Passage) -> str:
    """An article as the 来源 line names it: its title as a link, or as text for a file with no
    (web) URL or a link too long for one segment. Title and URL come from pages learned, so
    neither may plant markup of its own (MARKUP_OPEN)."""
    if passage.url == NOTE_URL:  # the owner's note: the account itself says so
        return NOTE_SOURCE
    title = "《{}》".format(passage.title.strip("《》 ").replace("<", "＜").replace(">", "＞"))
    tag = anchor_tag(passage.url)
    if not Markdown.WEB.match(passage.url) or utf8_len(tag + title + "</a>") > LINK_MOST:
        return title
    return f"{tag}{title}</a>"


class Citations:
    """Turns the model's citation markers into the links of the 来源 line, while it streams.

    The model cites the passages it was given as [1], [1][2], [1, 2], 【1】 or ［1］: each
    marker leaves the text (with the spaces before it), and `sources()` names the articles
    cited, in the order first cited, each once. A number no passage has (an invented [9])
    goes too. A marker split across pieces is held back until it is whole, so the text and
    the sources are the same whatever the pieces. A bracket that is no marker ([注意], a
    year [2025], a link's [1](...)) and code (inline or fenced) stay as written.
    Linear time: one regular expression (a character class) finds the next character that
    matters, and a marker is held back for MARKER_MOST characters at most.
    """

    OPEN, CLOSE = "[【［", "]】］"
    #: Between the numbers of one marker: [1, 2], [1，2], [1、2].
    SEPARATORS = ",，、 "
    #: A longer bracket is text: how much may be held back.
    MARKER_MOST = 16
    #: Spaces held back before what may be a marker; more than this stay.
    SPACES_MOST = 4
    #: What may open a marker, a code fence or inline code, or end a line.
    NOTABLE = re.compile("[\\[【［`~\n]")

    def __init__(self, passages: list[Passage]):
        self.passages = passages
        self.cited: list[int] = []   # indices of the passages cited, in the order first cited
        self.spaces = ""             # spaces written last, held back: a marker may follow
        self.marker: str | None = None  # a marker being read, as written
        self.numbers: list[str] = []    # its numbers so far
        self.closed = False          # it is whole: one more character says it is no link
        self.line_start = True       # nothing but spaces so far on this line
        self.fence = ""              # the fence of the code block the text is in
        self.run = ""                # fence characters opening this line so far
        self.inline_code = False     # an odd number of ` so far on this line

    def feed(self, piece: str) -> str:
        """The text of the answer so far that can be shown, markers taken out."""
        out: list[str] = []
        at = 0
        while at < len(piece):
            if self.marker is not None:
                self._marker_char(piece[at], out)
                at += 1
                continue
            found = self.NOTABLE.search(piece, at)
            end = found.start() if found else len(piece)
            if end > at:
                self._text(piece[at:end], out)
            if found:
                self._notable(found.group(), out)
            at = end + 1
        return "".join(out)

    def finish(self) -> str:
        """What was held back, once the model has finished."""
        out: list[str] = []
        if self.marker is not None and self.closed:
            self._cite()
        elif self.marker is not None:
            self._not_marker(out)
        out.append(self.spaces)
        self.spaces = ""
        return "".join(out)

    def sources(self, carded: int | None = None) -> str:
        """The line that ends the answer: 来源： and the cited articles; "" when none. The
        article whose card follows the answer (source id `carded`) is not named again."""
        links, seen = [], {carded}
        for index in self.cited:
            passage = self.passages[index]
            if passage.source_id not in seen and len(links) < MOST_SOURCES:
                seen.add(passage.source_id)
                links.append(source_link(passage))
        return SOURCES_HEAD + "、".join(links) if links else ""

    def _text(self, text: str, out: list[str]) -> None:
        """Text with nothing notable in it: shown, but for the spaces that end it."""
        body = text.rstrip(" \t")
        if body:
            self._line_goes_on()
            out += [self.spaces, body]
            self.spaces = ""
        spaces = self.spaces + text[len(body):]
        out.append(spaces[:-self.SPACES_MOST])
        self.spaces = spaces[-self.SPACES_MOST:]

    def _notable(self, char: str, out: list[str]) -> None:
        if char == "\n":
            self._line_goes_on()
            self.line_start, self.inline_code = True, False
        elif char in "`~" and self.line_start and self.run[:1] in ("", char):
            self.run += char  # a fence (``` or ~~~) opens or closes a code block
            if len(self.run) == 3:
                self.fence = "" if self.fence == self.run else self.fence or self.run
                self.line_start, self.run = False, ""
        elif char in self.OPEN and not (self.fence or self.inline_code):
            self._line_goes_on()
            self.marker, self.numbers, self.closed = char, [], False
            return  # the spaces before it wait with it
        else:
            self._line_goes_on()
            if char == "`" and not self.fence:
                self.inline_code = not self.inline_code
        out += [self.spaces, char]
        self.spaces = ""

    def _line_goes_on(self) -> None:
        """Something other than a fence character on this line: the backticks that opened
        it were inline code."""
        if self.run[:1] == "`" and not self.fence and len(self.run) % 2:
            self.inline_code = not self.inline_code
        self.line_start, self.run = False, ""

    def _marker_char(self, char: str, out: list[str]) -> None:
        """One more character after the opening of what may be a marker."""
        if self.closed:
            if char == "(":  # a Markdown link's text: [1](https://...)
                self._not_marker(out)
            else:
                self._cite()
            out.append(self.feed(char))
            return
        if len(self.marker) >= self.MARKER_MOST:
            return self._give_up(char, out)
        if char in "0123456789":
            if self.marker[-1:].isdigit() and len(self.numbers[-1]) < 2:
                self.numbers[-1] += char
            elif self.marker[-1:].isdigit():  # three digits: a year, a price, no passage
                return self._give_up(char, out)
            else:
                self.numbers.append(char)
        elif char in self.SEPARATORS or (char == "^" and self.marker in self.OPEN):
            pass
        elif char in self.CLOSE and self.numbers:
            self.closed = True
        else:
            return self._give_up(char, out)
        self.marker += char

    def _give_up(self, char: str, out: list[str]) -> None:
        """What was held is text after all; the character that showed it is read anew."""
        self._not_marker(out)
        out.append(self.feed(char))

    def _not_marker(self, out: list[str]) -> None:
        out += [self.spaces, self.marker]
        self.spaces, self.marker = "", None

    def _cite(self) -> None:
        """A whole marker: its passages are cited, it leaves the text with its spaces."""
        for number in map(int, self.numbers):
            index = number - 1
            if 0 <= index < len(self.passages) and index not in self.cited:
                self.cited.append(index)
        self.spaces, self.marker = "", None


def cited_stream(pieces: Iterator[str], citations: Citations) -> Iterator[str]:
    """The answer's pieces with their citation markers taken out (Citations)."""
    for piece in pieces:
        yield citations.feed(piece)
    yield citations.finish()


###############################################################################
# Menus, fixed replies and blocked words ######################################
###############################################################################

# INFO: with 服务器配置 on, the 公众号后台's own menu editor and 自动回复 stop serving
# (WECHAT.md §8): these give them back, from files the owner edits.

#: What each menu button type needs besides its name (WECHAT.md §8).
MENU_TYPES = {
    "click": ("key",), "view": ("url",), "miniprogram": ("url", "appid", "pagepath"),
    "scancode_push": ("key",), "scancode_waitmsg": ("key",), "pic_sysphoto": ("key",),
    "pic_photo_or_album": ("key",), "pic_weixin": ("key",), "location_select": ("key",),
    "media_id": ("media_id",), "article_id": ("article_id",),
    "article_view_limited": ("article_id",),
}
#: Byte limits of the menu's fields (UTF-8), as WeChat counts them.
MENU_LIMITS = {"key": 128, "url": 1024}
MENU_TOP_BUTTONS, MENU_SUB_BUTTONS = 3, 5
MENU_TOP_NAME, MENU_SUB_NAME = 16, 60
#: The menu API's return codes in the owner's words (WeChat's global return codes).
MENU_ERRORS = {
    48001: "this account may not use the menu API: an unverified 订阅号 cannot; verify the "
           "account, or set the menu in 公众号后台 with 服务器配置 turned off",
    40015: "WeChat refused a button's type",
    40016: "WeChat refused the number of top-level buttons (1 to 3)",
    40017: "WeChat refused a top-level button's type",
    40018: "WeChat refused a top-level button's name length (at most 16 bytes)",
    40019: "WeChat refused a top-level button's key length (at most 128 bytes)",
    40020: "WeChat refused a top-level button's url length (at most 1024 bytes)",
    40022: "WeChat refused the menu's depth (sub-buttons cannot have sub-buttons)",
    40023: "WeChat refused the number of sub-buttons of a button (1 to 5)",
    40024: "WeChat refused a sub-button's type",
    40025: "WeChat refused a sub-button's name length (at most 60 bytes)",
    40026: "WeChat refused a sub-button's key length (at most 128 bytes)",
    40027: "WeChat refused a sub-button's url length (at most 1024 bytes)",
    40054: "WeChat refused a sub-button's url domain",
    40055: "WeChat refused a top-level button's url domain",
    46003: "there is no menu",
    65316: "the menu links to too many domains (WeChat allows 3)",
    65317: "WeChat refused a url of the menu",
}


class FileProblem(Exception):
    """An owner's file (menu, replies, blocked words) that cannot be used; each problem a line."""

    def __init__(self, path: str, problems: list[str], setting: str = ""):
        super().__init__("; ".join(problems))
        self.path, self.problems = path, problems
        self.setting = setting  # the setting that names the file, where one does

    def where(self) -> str:
        """The file as the owner named it: `WXBOT_REPLIES: /path`, or the path alone."""
        return f"{self.setting}: {self.path}" if self.setting else self.path


def read_json_file(path: str) -> object:
    """A JSON file's value; FileProblem names the line and column of a syntax error, and says
    what else json cannot take (a huge number, nesting deeper than the stack)."""
    try:
        with open(path, encoding="utf-8-sig") as json_file:
            return json.load(json_file)
    except json.JSONDecodeError as error:
        raise FileProblem(path, [f"line {error.lineno}, column {error.colno}: "
                                 f"not valid JSON ({error.msg})"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise FileProblem(path, [f"cannot read it: {error}"]) from None
    except ValueError as error:  # a number of more than 4300 digits (sys.int_info)
        raise FileProblem(path, [f"not usable JSON ({error})"]) from None
    except RecursionError:
        raise FileProblem(path, ["not usable JSON (lists or objects nested too deep)"]) from None


def menu_problems(menu: object) -> list[str]:
    """Every reason WeChat would refuse this menu, each with its JSON path; [] when it is good."""
    if not isinstance(menu, dict) or not isinstance(menu.get("button"), list):
        return ['the file must be an object with a "button" list: {"button": [...]}']
    problems = [f"{key}: unknown field (a menu has only \"button\")"
                for key in menu if key != "button"]
    buttons = menu["button"]
    if not 1 <= len(buttons) <= MENU_TOP_BUTTONS:
        problems.append(f"button: {len(buttons)} buttons, WeChat allows 1 to {MENU_TOP_BUTTONS}")
    for n, button in enumerate(buttons):
        path = f"button[{n}]"
        if not isinstance(button, dict):
            problems.append(f"{path}: must be an object")
            continue
        problems += _name_problems(button, path, MENU_TOP_NAME)
        subs = button.get("sub_button")
        if subs is None or subs == []:
            problems += _action_problems(button, path)
            continue
        if not isinstance(subs, list):
            problems.append(f"{path}.sub_button: must be a list")
            continue
        if len(subs) > MENU_SUB_BUTTONS:
            problems.append(f"{path}.sub_button: {len(subs)} buttons, WeChat allows at most "
                            f"{MENU_SUB_BUTTONS}")
        for m, sub in enumerate(subs):
            sub_path = f"{path}.sub_button[{m}]"
            if not isinstance(sub, dict):
                problems.append(f"{sub_path}: must be an object")
                continue
            problems += _name_problems(sub, sub_path, MENU_SUB_NAME)
            if sub.get("sub_button") not in (None, []):
                problems.append(f"{sub_path}.sub_button: a sub-button cannot have sub-buttons")
            problems += _action_problems(sub, sub_path)
    return problems


def _name_problems(button: dict, path: str, limit: int) -> list[str]:
    name = button.get("name")
    if not isinstance(name, str) or not name.strip():
        return [f"{path}.name: missing (every button needs a name)"]
    if utf8_len(name) > limit:
        return [f"{path}.name: {name!r} is {utf8_len(name)} bytes, WeChat allows {limit} "
                f"(a Chinese character is 3 bytes)"]
    return []


def _action_problems(button: dict, path: str) -> list[str]:
    kind = button.get("type")
    if kind not in MENU_TYPES:
        return [f"{path}.type: {'missing' if kind is None else repr(kind) + ' is not a type'}; "
                f"one of {', '.join(MENU_TYPES)} (or sub_button for a button that opens a list)"]
    problems = []
    for field in MENU_TYPES[kind]:
        value = button.get(field)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{path}.{field}: missing (type {kind} needs it)")
        elif field in MENU_LIMITS and utf8_len(value) > MENU_LIMITS[field]:
            problems.append(f"{path}.{field}: {utf8_len(value)} bytes, WeChat allows "
                            f"{MENU_LIMITS[field]}")
        elif field == "url" and not value.startswith(("http://", "https://")):
            problems.append(f"{path}.url: must start with http:// or https://")
    return problems


def load_menu(path: str) -> dict:
    """The menu in a file, checked; FileProblem lists every problem."""
    menu = read_json_file(path)
    problems = menu_problems(menu)
    if problems:
        raise FileProblem(path, problems)
    return menu


def menu_in_force(info: dict) -> dict | None:
    """get_current_selfmenu_info's answer as a menu file ({"button": [...]}), or None.

    That API nests sub-buttons as {"sub_button": {"list": [...]}}; menu/create takes a list.
    """
    if not info.get("is_menu_open") or not info.get("selfmenu_info"):
        return None
    buttons = []
    for button in info["selfmenu_info"].get("button", []):
        button = dict(button)
        if isinstance(button.get("sub_button"), dict):
            button["sub_button"] = button["sub_button"].get("list", [])
        buttons.append(button)
    return {"button": buttons}


def menu_error(error: WeChatError) -> str:
    """A menu API error as a sentence for the owner."""
    return f"{MENU_ERRORS.get(error.errcode, error.hint())} (errcode {error.errcode})" \
        if error.errcode in MENU_ERRORS else f"WeChat refused: {error.hint()}"


#: Full-width forms and the ideographic space fold to their usual forms and ASCII to lower case,
#: one character for one, so that a match's place in the folded text is its place in the text.
_FOLD = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}
for _code in (0x3000, *range(0xFF01, 0xFFEF)):
    _folded = unicodedata.normalize("NFKC", chr(_code))
    if len(_folded) == 1:
        _FOLD[_code] = _folded.lower() if _folded.isascii() else _folded
del _code, _folded
#: Replaces each character of a blocked word in an answer.
MASK = "＊"


class BlockedWords:
    """Blocked words and phrases, found ignoring ASCII case, full/half width and spaces inside.

    A trie walked from each character: 10,000 words cost one dict lookup per character of the
    text, where one regular expression of them all would try every word at every character.
    """

    def __init__(self, words: list[str] = ()):
        self.trie: dict = {}
        self.count = self.longest = 0
        for word in words:
            word = _SPACES.sub("", word.translate(_FOLD))
            if not word:
                continue
            node = self.trie
            for char in word:
                node = node.setdefault(char, {})
            self.count += "" not in node
            node[""] = True
            self.longest = max(self.longest, len(word))

    @classmethod
    def read(cls, path: str) -> "BlockedWords":
        """One word or phrase a line; blank lines and lines starting with # are skipped."""
        try:
            with open(path, encoding="utf-8-sig") as words_file:
                lines = words_file.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise FileProblem(path, [f"cannot read it: {error}"]) from None
        return cls([line for line in lines if not line.lstrip().startswith("#")])

    def spans(self, text: str, first_only: bool = False) -> list[tuple[int, int]]:
        """(start, end) in text of the longest blocked word starting at each character."""
        if not self.trie:
            return []
        folded = text.translate(_FOLD)
        squeezed = _SPACES.sub("", folded)
        kept = None if len(squeezed) == len(folded) else \
            [at for at, char in enumerate(folded) if not char.isspace()]
        found, root, length = [], self.trie, len(squeezed)
        for start, char in enumerate(squeezed):
            node = root.get(char)
            end, at = 0, start + 1
            while node is not None:
                if "" in node:
                    end = at
                if at == length:
                    break
                node = node.get(squeezed[at])
                at += 1
            if end:
                found.append((start, end) if kept is None else (kept[start], kept[end - 1] + 1))
                if first_only:
                    break
        return found

    def describe(self) -> str:
        return f"{self.count} blocked words"

    def found(self, text: str) -> bool:
        return bool(self.spans(text, first_only=True))

    def mask(self, text: str) -> str:
        """text with every character of every blocked word replaced by ＊."""
        return StreamMask(self).feed(text, final=True)


class StreamMask:
    """Masks blocked words in an answer that arrives in pieces, where a word may straddle two:
    the last characters that could start a word are held back until the next piece shows
    whether they do. Joined, the output is mask() of the whole answer."""

    def __init__(self, words: BlockedWords):
        self.words = words
        self.held = ""
        self.masked: list[bool] = []

    def feed(self, piece: str, final: bool = False) -> str:
        """The part of the answer so far that can be shown, masked."""
        text = self.held + piece
        masked = self.masked + [False] * len(piece)
        for start, end in self.words.spans(text):
            masked[start:end] = [True] * (end - start)
        cut = len(text) if final else self._cut(text)
        self.held, self.masked = text[cut:], masked[cut:]
        if True not in masked:  # the usual piece: nothing to hide
            return text[:cut]
        return "".join(MASK if hide else char for char, hide in zip(text[:cut], masked))

    def finish(self) -> str:
        """What was held back, once the answer is complete (or broke off)."""
        return self.feed("", final=True)

    def _cut(self, text: str) -> int:
        """Where the held-back tail starts: the last longest-1 characters other than spaces.
        A word starting before it ends within the text, so it has been found."""
        hold = self.words.longest - 1
        at = len(text)
        while hold > 0 and at > 0:
            at -= 1
            hold -= not text[at].isspace()
        return at


def masked_stream(pieces: Iterator[str], words: BlockedWords) -> Iterator[str]:
    """The answer's pieces with blocked words masked; what is held back still comes out
    when the stream breaks off, before the error."""
    if not words.trie:  # no blocked words: the pieces as they come
        yield from pieces
        return
    mask = StreamMask(words)
    try:
        for piece in pieces:
            shown = mask.feed(piece)
            if shown:
                yield shown
    except ModelError:
        rest = mask.finish()
        if rest:
            yield rest
        raise
    rest = mask.finish()
    if rest:
        yield rest


@dataclasses.dataclass
class Replies:
    """The owner's fixed replies (WXBOT_REPLIES): to keywords, compared as classify() compares
    words, and to menu clicks by EventKey: a text, or a question the model answers."""

    keywords: dict = dataclasses.field(default_factory=dict)  # normalised keyword -> text
    clicks: dict = dataclasses.field(default_factory=dict)    # EventKey -> text
    prompts: dict = dataclasses.field(default_factory=dict)   # EventKey -> question

    @classmethod
    def read(cls, path: str) -> "Replies":
        """The replies in a file, checked; FileProblem names every problem with its path."""
        value = read_json_file(path)
        if not isinstance(value, dict):
            raise FileProblem(path, ['the file must be an object: {"keywords": {...}, '
                                     '"clicks": {...}}'])
        problems = [f"{key}: unknown field (use keywords and clicks)" for key in value
                    if key not in ("keywords", "clicks")]
        replies = cls()
        for section in ("keywords", "clicks"):
            entries = value.get(section, {})
            if not isinstance(entries, dict):
                problems.append(f"{section}: must be an object")
                continue
            for key, reply in entries.items():
                problems += replies._add(section, key, reply)
        if problems:
            raise FileProblem(path, problems)
        return replies

    def _add(self, section: str, key: str, reply: object) -> list[str]:
        path = f"{section}.{key}"
        if section == "clicks" and isinstance(reply, dict):
            prompt = reply.get("prompt")
            if set(reply) != {"prompt"} or not isinstance(prompt, str) or not prompt.strip():
                return [f'{path}: a click for the model is {{"prompt": "the question"}}']
            self.prompts[key] = prompt.strip()
            return []
        if not isinstance(reply, str) or not reply.strip():
            return [f"{path}: the reply must be a text" + (
                ' or {"prompt": "a question for the model"}' if section == "clicks" else "")]
        if utf8_len(reply.strip()) > SEGMENT_BYTES:
            return [f"{path}: the reply is {utf8_len(reply.strip())} bytes; one WeChat message "
                    f"holds {SEGMENT_BYTES}"]
        if section == "clicks":
            self.clicks[key] = reply.strip()
            return []
        word = normalise(key)
        if not word:
            return [f"{path}: a keyword needs a letter or a character, not only punctuation"]
        if classify("text", key).kind is not Kind.QUESTION:
            return [f"{path}: {key!r} is one of wxbot's own commands"]
        if word in self.keywords:
            return [f"{path}: the same keyword as another one (spaces, punctuation, case "
                    f"and width do not count)"]
        self.keywords[word] = reply.strip()
        return []

    def describe(self) -> str:
        return (f"{len(self.keywords)} keyword replies, {len(self.clicks)} click replies, "
                f"{len(self.prompts)} clicks for the model")

    def prompt_for(self, event: str | None, event_key: str) -> str | None:
        """The question a menu click asks the model for the user, if it is one that does."""
        return self.prompts.get(event_key) if event == "CLICK" else None

    def fixed_reply(self, msg_type: str, content: str | None, event: str | None,
                    event_key: str) -> tuple[str, str] | None:
        """(counter, text) when the message gets a fixed reply without the model."""
        if msg_type == "event":
            reply = self.clicks.get(event_key) if event == "CLICK" else None
            return ("click_replies", reply) if reply else None
        if classify(msg_type, content, self.keywords).kind is Kind.KEYWORD:
            return "keyword_replies", self.keywords[normalise(content)]
        return None


class OwnerFile:
    """A file the owner edits while wxbot runs (replies, blocked words): re-read when its
    modification time, size or inode changes, or on SIGHUP. A broken edit keeps what was
    read before and the log says why; a broken file at start stops the start."""

    def __init__(self, setting: str, path: str, read: Callable[[str], object], empty: object,
                 example: str):
        self.setting, self.path, self.read, self.example = setting, path, read, example
        self._lock = threading.Lock()
        self.value, self._stamp = (self._first(), self._look()) if path else (empty, None)

    def _first(self) -> object:
        """The file at start; FileProblem names the setting, and for a missing file the
        example that comes with wxbot.py to copy (the example settings name files that
        are not shipped, so that the owner's edits are never overwritten by an update)."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            example = os.path.join(os.path.dirname(os.path.abspath(__file__)), self.example)
            raise FileProblem(self.path, [f"there is no such file: leave {self.setting} "
                                          f"empty, or start from the example: cp {example} "
                                          f"{self.path}"], self.setting) from None
        except OSError:
            pass  # the reader says why it cannot read the file
        try:
            return self.read(self.path)
        except FileProblem as error:
            error.setting = self.setting
            raise

    def _look(self) -> tuple | None:
        try:
            found = os.stat(self.path)
        except OSError:
            return None
        return found.st_mtime_ns, found.st_size, found.st_ino

    def current(self) -> object:
        """The file's value, re-read first when the file has changed."""
        if self.path and self._look() != self._stamp:
            self.reload()
        return self.value

    def reload(self) -> None:
        with self._lock:
            stamp = self._look()
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a broken version is reported once, not at every message
            try:
                self.value = self.read(self.path)
            except FileProblem as error:
                log.error("%s is not used, the previous version stays in force: %s", self.path,
                          "; ".join(error.problems))
                return
            log.info("%s re-read", self.path)

    def stale(self) -> None:
        """Re-read at the next look whatever the file's stamp (SIGHUP)."""
        self._stamp = ()


class OwnerFiles:
    """The owner's fixed replies and blocked words, each re-read when its file changes."""

    def __init__(self, settings: Settings):
        self.replies_file, self.blocked_file = (OwnerFile(*file)
                                                for file in self.files(settings))

    @staticmethod
    def files(settings: Settings) -> list[tuple]:
        """Each file: its setting, path, reader, value when unset and example beside wxbot.py."""
        return [("WXBOT_REPLIES", settings.replies, Replies.read, Replies(),
                 "replies.example.json"),
                ("WXBOT_BLOCKED_WORDS", settings.blocked_words, BlockedWords.read,
                 BlockedWords(), "blocked_words.example.txt")]

    @property
    def replies(self) -> Replies:
        return self.replies_file.current()

    @property
    def blocked(self) -> BlockedWords:
        return self.blocked_file.current()

    def stale(self) -> None:
        self.replies_file.stale()
        self.blocked_file.stale()


###############################################################################
# Acknowledgement: typing and the queue line ##################################
###############################################################################

def queue_line(ahead: int, wait: float, answer_seconds: float, more: bool = False) -> str:
    """The line for a message that waits: how many are ahead and when the answer comes; `more`:
    more are queued than were counted, so both are at least that."""
    minutes = max(1, math.ceil((wait + answer_seconds) / 60))
    return (QUEUE_LINE_LONG if more else QUEUE_LINE).format(ahead=ahead, minutes=minutes)


class Route(enum.Enum):
    """How a message is answered (route()): only MODEL_ROUTES take the model."""

    FIXED = "fixed"        # a keyword's or a click's fixed reply (text; counter)
    PROMPT = "prompt"      # a click the owner answers with a prompt (text: the prompt)
    EVENT = "event"        # the welcome, or nothing (LOCATION every 5 s, VIEW...)
    RESET = "reset"
    HELP = "help"
    STATS = "stats"        # an admin's /stats
    CONTINUE = "continue"
    DRAW = "draw"          # text: what to draw
    DRAW_HOW = "draw_how"  # 画 with nothing to draw
    UNHEARD = "unheard"    # a voice message without Recognition
    PICTURE = "picture"    # a picture for the model (WXBOT_VISION; picture: its URL)
    TEXT_ONLY = "text_only"  # a picture without vision, a location, a link, a video...
    BLOCKED = "blocked"    # a question or a drawing with a blocked word (WXBOT_BLOCKED_WORDS)
    PERSON = "person"      # asks for a person: told once, the owner told, the bot quiet
    HELD = "held"          # a reader a person answers (Handoff): kept, no answer
    QUESTION = "question"  # text: the question


#: The routes whose answer takes the model: only these wait for a worker and show typing.
MODEL_ROUTES = frozenset({Route.PROMPT, Route.DRAW, Route.PICTURE, Route.QUESTION})
#: The kinds of message answered one way whoever sends them, whatever they say.
KIND_ROUTES = {Kind.EVENT: Route.EVENT, Kind.RESET: Route.RESET, Kind.HELP: Route.HELP,
               Kind.CONTINUE: Route.CONTINUE}


@dataclasses.dataclass(frozen=True)
class Answering:
    """route()'s decision: how, and what it needs (the question, the line, the picture)."""

    route: Route
    text: str = ""
    picture: str = ""
    counter: str = ""


def person_words(settings: Settings) -> Sequence[str]:
    """The words that ask for a person (WXBOT_HANDOFF_WORDS), where one can answer and hears
    of it: from the console, through the notify URL, or in WeChat's own 客服. Else 转人工 is
    a question."""
    someone = settings.handoff == "wechat" or bool(settings.admin_password or
                                                   settings.notify_url)
    return settings.handoff_words if someone else ()


def route(settings: Settings, replies: Replies, message: "Push | Message",
          blocked: BlockedWords | None = None, handoff: "Handoff | None" = None) -> Answering:
    """How a push or a stored message is answered. The one rule: the webhook stores
    whether it needs the model (needs_model()), and Worker.plan answers it this way.
    A question or a drawing with a blocked word is refused without the model: no typing
    promises an answer that never comes. A reader handed to a person (`handoff`) gets
    nothing from the bot but for events (the welcome); asking for one again is asking (the
    webhook marked the reader as asking as 转人工 arrived: the worker still tells them, once)."""
    words = person_words(settings)
    if handoff and message.msg_type != "event" and handoff.holds(
            message.openid, time.time(), getattr(message, "received_at", None)):
        return Answering(Route.PERSON if classify(
            message.msg_type, message.content, replies.keywords,
            person_words=words).kind is Kind.PERSON else Route.HELD)
    event_key = message.fields.get("EventKey", "")
    fixed = replies.fixed_reply(message.msg_type, message.content, message.event, event_key)
    if fixed:
        return Answering(Route.FIXED, fixed[1], counter=fixed[0])
    prompt = replies.prompt_for(message.event, event_key)
    if prompt:
        return Answering(Route.PROMPT, prompt)
    intent = classify(message.msg_type, message.content, replies.keywords,
                      drawing=bool(settings.image_model), person_words=words)
    if intent.kind is Kind.PERSON:
        return Answering(Route.PERSON)
    if intent.kind in KIND_ROUTES:
        return Answering(KIND_ROUTES[intent.kind])
    if intent.kind is Kind.STATS and message.openid in settings.admins:
        return Answering(Route.STATS)
    if intent.kind in (Kind.DRAW, Kind.QUESTION) and blocked and blocked.found(intent.text):
        return Answering(Route.BLOCKED)
    if intent.kind is Kind.DRAW:
        return Answering(Route.DRAW, intent.text) if intent.text else Answering(Route.DRAW_HOW)
    if message.msg_type == "voice" and not intent.text:
        return Answering(Route.UNHEARD)
    picture = message.fields.get("PicUrl", "") if message.msg_type == "image" else ""
    if settings.vision and picture.startswith(("http://", "https://")):
        return Answering(Route.PICTURE, picture=picture)
    if message.msg_type not in ("text", "voice") or not intent.text:
        return Answering(Route.TEXT_ONLY)
    return Answering(Route.QUESTION, intent.text)


def needs_model(settings: Settings, replies: Replies, push: "Push",
                blocked: BlockedWords | None = None, handoff: "Handoff | None" = None) -> bool:
    """Whether answering a push takes the model (route()): a question, a drawing, a picture
    with WXBOT_VISION, /stats from anyone but an admin, a click the owner answers with a
    prompt. Only those wait for a worker, and show typing meanwhile. The rest (继续, /help, a
    keyword, the welcome, a voice message without Recognition, a location, a question with a
    blocked word...) is answered from what is stored, by a Sender, however busy the workers
    are (LOCATION may come every 5 s)."""
    return route(settings, replies, push, blocked, handoff).route in MODEL_ROUTES


class Acknowledger:
    """Shows every user at once that their message was seen, however deep the queue.

    The worker that will answer may be minutes away in a burst, and WeChat refuses typing 30 s
    after the user's message (45080); so typing goes out within moments of each push from a
    few threads of this sender's own, and is renewed once after 15 s while the answer is
    still coming. A message that will wait longer than WXBOT_QUEUE_NOTICE seconds gets one
    short line instead, saying how long; it takes one of the message's 5 (Store.quota).
    A message that will get no answer (its user is over a limit and was told) gets neither.
    Passive mode has no customer-service API: nothing is sent.
    """

    #: Threads calling WeChat: a typing call takes about 50 ms from a VPS in China, so 8
    #: acknowledge some 150 pushes a second.
    THREADS = 8
    #: Typing shows for 15 s and cannot be renewed while shown (45081).
    TYPING_RENEW = 15.5
    #: WeChat refuses typing this long after the user's message (45080).
    TYPING_WINDOW = 30.0
    #: How long an answer is taken to need while the database holds none (seconds).
    ANSWER_GUESS = 10.0
    #: How often the time answers take is read again from the database (seconds).
    ANSWER_LOOK = 10.0

    def __init__(self, settings: Settings, store: Store, wechat: WeChatAPI, mode: DeliveryMode):
        self.settings, self.store, self.wechat, self.mode = settings, store, wechat, mode
        self.answer_seconds = self.ANSWER_GUESS
        self._timed_at = -math.inf  # when answer_seconds was read
        self._due: list[tuple[float, int, str, float, bool]] = []  # heap: when, id, openid, ...
        self._condition = threading.Condition()  # notified when a job is added or on stop
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"acknowledger-{n}",
                                          daemon=True) for n in range(self.THREADS)]

    def start(self) -> None:
        self._answer_time(time.time())  # a restart in a burst knows the answers' pace
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        deadline = time.monotonic() + 5  # in all; a call still in flight ends with the process
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def pushed(self, message_id: int, openid: str, received_at: float) -> None:
        """A message was stored (or found queued at start): acknowledge it now."""
        self._add(received_at, message_id, openid, received_at, True)

    def nothing_comes(self, openid: str, received_at: float) -> None:
        """A message was settled with nothing to send: typing shown for it (before its user
        was told of a limit) must not end in silence."""
        if not self.mode.passive and time.time() - received_at < self.TYPING_WINDOW:
            self.wechat.typing(openid, "CancelTyping")

    def _add(self, when: float, message_id: int, openid: str, received_at: float,
             first: bool) -> None:
        with self._condition:
            heapq.heappush(self._due, (when, message_id, openid, received_at, first))
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and (not self._due or self._due[0][0] > time.time()):
                    self._condition.wait(self._due[0][0] - time.time() if self._due else None)
                if self._stopping:
                    return
                # The first acks of a burst together: their queue lines are noted in one commit.
                jobs = []
                while self._due and self._due[0][0] <= time.time() and len(jobs) < 32:
                    jobs.append(heapq.heappop(self._due))
            if not self.mode.passive:
                self._acknowledge(jobs)

    def _acknowledge(self, jobs: list[tuple[float, int, str, float, bool]]) -> None:
        lines = {}
        for _, message_id, openid, received_at, first in jobs:
            with self._alone(message_id, "typing or queue line"):
                line = self._look(message_id, openid, received_at, first)
                if line:
                    lines[message_id] = (openid, line, received_at)
        noted = self._note(list(lines))
        for message_id, (openid, line, received_at) in lines.items():
            with self._alone(message_id, "queue line"):
                if message_id not in noted:  # not noted, not sent: typing says it was seen
                    self._typing(openid, received_at)
                    continue
                try:
                    self.wechat.customer_service_send(openid, line)
                except WeChatError as error:  # the answer still comes; the log says why not this
                    log_wechat.warning("queue line for message %s not sent: %s", message_id,
                                       error.hint())

    def _look(self, message_id: int, openid: str, received_at: float, first: bool
              ) -> str | None:
        """Show typing for a message, or return its queue line when it will wait long."""
        now = time.time()
        if self.store.settled(message_id):  # answered already: typing would mislead
            return None
        if self.store.get_kv(LIMIT_NOTICE_KEY.format(openid=openid, kind="calls"), now):
            return None  # over a limit and told so: no answer comes, nothing may promise one
        if first:
            self._add(now + self.TYPING_RENEW, message_id, openid, received_at, False)
            answer_seconds = self._answer_time(now) if self.settings.queue_notice else 0.0
            # The people ahead are counted only where as many messages could make the reader
            # wait: a fast model's queue of thousands is gone in seconds, and counting them
            # for each push cost the webhook its CPU.
            if self.settings.queue_notice and self.store.queued_at_most(message_id) / \
                    self.settings.workers * answer_seconds > self.settings.queue_notice:
                ahead, more = self.store.waiting_ahead(message_id, openid, now)
                wait = ahead / self.settings.workers * answer_seconds
                if more or wait > self.settings.queue_notice:
                    return queue_line(ahead, wait, answer_seconds, more)
        self._typing(openid, received_at)
        return None

    def _typing(self, openid: str, received_at: float) -> None:
        if time.time() - received_at < self.TYPING_WINDOW:  # else too late (45080)
            self.wechat.typing(openid)

    def _answer_time(self, now: float) -> float:
        """How long an answer takes, as the database last told (Store.answer_seconds)."""
        if now - self._timed_at >= self.ANSWER_LOOK:
            self._timed_at = now
            self.answer_seconds = self.store.answer_seconds() or self.ANSWER_GUESS
        return self.answer_seconds

    def _note(self, message_ids: list[int]) -> set[int]:
        """Note the queue lines of a batch in one commit; should it fail, one at a time, so
        that a failure costs only its own message."""
        try:
            return set(self.store.note_queue_lines(message_ids, time.time()))
        except sqlite3.Error:
            noted = set()
            for message_id in message_ids:
                with self._alone(message_id, "queue line"):
                    noted.update(self.store.note_queue_lines([message_id], time.time()))
            return noted

    @contextlib.contextmanager
    def _alone(self, message_id: int, what: str) -> Iterator[None]:
        """A failure costs the one message it concerns, and the log says which and why."""
        try:
            yield
        except sqlite3.Error as error:
            log_wechat.warning("message %s: %s skipped, the database failed (%s: %s)",
                               message_id, what, type(error).__name__, error)
        except Exception:  # a typing line is never worth a thread, nor the batch
            log_wechat.exception("message %s: %s skipped", message_id, what)


###############################################################################
# Telling the owner: notifications ############################################
###############################################################################

#: What the owner is told of (WXBOT_NOTIFY_URL), each kind at most once a minute.
NOTIFY_KINDS = {"person": "读者要找人工", "undelivered": "消息未送达", "model": "模型持续失败",
                "model_back": "模型已恢复", "disk": "磁盘已满", "uncovered": "今天没有文章覆盖的问题", "test": "测试通知"}

NOTIFY_SCHEMA = """
-- What the owner was told, or was to be told (sent = 0: the URL failed): the daily list of
-- questions no article covered goes once a day by this record.
CREATE TABLE IF NOT EXISTS notifications (
    id      INTEGER PRIMARY KEY,
    kind    TEXT NOT NULL,
    text    TEXT NOT NULL,
    at      REAL NOT NULL,
    sent    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS notifications_kind ON notifications (kind, at);
"""


def notify_body(url: str, kind: str, text: str, at: float) -> dict:
    """The POST's JSON as the URL's host takes it: a group robot of 企业微信 or 钉钉 (msgtype
    text), 飞书/Lark (msg_type text), or anything else (plain JSON)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    line = f"【wxbot】{NOTIFY_KINDS.get(kind, kind)}\n{text}"
    if host in ("qyapi.weixin.qq.com", "oapi.dingtalk.com"):
        return {"msgtype": "text", "text": {"content": line}}
    if host.endswith(("feishu.cn", "larksuite.com")):
        return {"msg_type": "text", "content": {"text": line}}
    return {"kind": kind, "title": NOTIFY_KINDS.get(kind, kind), "text": text,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))}


class Notifier:
    """Tells the owner what matters by a POST to WXBOT_NOTIFY_URL, from a thread of its own:
    an answer never waits for it. At most one message a minute of each kind: the rest are
    counted, and the last of them goes with their count once the minute is over (flush), or
    with the next of its kind; a failing URL is logged once, until it works again."""

    #: Seconds between two messages of one kind.
    EVERY = 60.0
    #: How often the thread looks for the day's uncovered questions.
    DAILY_LOOK = 3600.0

    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.time):
        self.url, self.store, self.clock = settings.notify_url, store, clock
        self._last: dict[str, float] = {}
        self._held: collections.Counter = collections.Counter()
        self._held_text: dict[str, str] = {}  # the last of those held back, by kind
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.failure = Failing()
        self.stopping = threading.Event()
        with store.transaction() as conn:
            upgrade_tables(conn, NOTIFY_SCHEMA)

    def tell(self, kind: str, text: str) -> bool:
        """Queue a message for the owner; False when none goes (no URL, or one of this kind
        went within the minute: it is counted in the next)."""
        if not self.url:
            return False
        now = self.clock()
        with self._lock:
            if now - self._last.get(kind, -self.EVERY) < self.EVERY:
                self._held[kind] += 1
                self._held_text[kind] = text
                if self._held[kind] == 1:  # the thread is to flush it at the minute's end
                    self._outbox.put(("", "", now))
                return False
            self._last[kind] = now
            held, self._held[kind] = self._held[kind], 0
        if held:
            text += f"\n（上一条之后还有 {held} 次同类情况）"
        self._outbox.put((kind, text, now))
        return True

    def flush(self) -> float:
        """Queue what was held back of each kind whose minute is over: its last message, and
        how many there were. Seconds until the next minute ends with something held."""
        now, due = self.clock(), []
        with self._lock:
            for kind in [kind for kind, held in self._held.items() if held]:
                if now - self._last[kind] < self.EVERY:
                    due.append(self._last[kind] + self.EVERY - now)
                    continue
                held, self._held[kind], self._last[kind] = self._held[kind], 0, now
                self._outbox.put((kind, f"{self._held_text.pop(kind)}\n（上一条之后共 {held} "
                                        f"次同类情况，这是最近一次）", now))
        return min(due, default=self.DAILY_LOOK)

    def send(self, kind: str, text: str, at: float) -> str | None:
        """POST one message now; None when the URL took it, else why not (for `check`)."""
        problem = None
        try:
            answer = requests.post(self.url, json=notify_body(self.url, kind, text, at),
                                   timeout=10)
            body = answer.json() if "json" in answer.headers.get("Content-Type", "") else {}
            code = body.get("errcode", body.get("code", 0)) if isinstance(body, dict) else 0
            if answer.status_code >= 300 or code:
                problem = f"HTTP {answer.status_code}" + (f", errcode {code}" if code else "")
        except (requests.RequestException, ValueError) as error:
            problem = type(error).__name__
        with contextlib.suppress(sqlite3.Error):  # a full disk is itself worth a message
            with self.store.transaction() as conn:
                conn.execute("INSERT INTO notifications (kind, text, at, sent) VALUES"
                             " (?, ?, ?, ?)", (kind, text, at, problem is None))
        if self.failure.turned(problem is not None):
            if problem:
                log.error("WXBOT_NOTIFY_URL %s refused a notification (%s): the owner is not "
                          "told until it works; check the URL (`python wxbot.py check` sends "
                          "a test)", masked_url(self.url), problem)
            else:
                log.info("WXBOT_NOTIFY_URL works again")
        return problem

    def run(self) -> None:
        """Send what is queued; once an hour, the day's uncovered questions."""
        next_look = self.clock() + 60
        while not self.stopping.is_set():
            try:
                kind, text, at = self._outbox.get(timeout=max(0.1, min(
                    self.flush(), next_look - self.clock())))
            except queue.Empty:
                kind = None
            if kind == "stop":
                return
            if kind:
                self.send(kind, text, at)
            if self.clock() >= next_look:
                next_look = self.clock() + self.DAILY_LOOK
                with contextlib.suppress(sqlite3.Error):
                    self.uncovered_today(self.clock())

    def stop(self) -> None:
        self.stopping.set()
        self._outbox.put(("stop", "", 0.0))

    def uncovered_today(self, now: float) -> bool:
        """Once a day: the questions of the last 24 h that no article covered, grouped."""
        with self.store.connection() as conn:
            if conn.execute("SELECT 1 FROM notifications WHERE kind = 'uncovered' AND at > ?",
                            (now - 86400,)).fetchone():
                return False
            groups = uncovered_questions(conn, now - 86400)
        if not groups:
            return False
        lines = [f"{group['count']}× {group['content'][:60]}" for group in groups[:10]]
        return self.tell("uncovered", "\n".join(lines) + "\n在控制台 问题 → 没有文章覆盖 写下答案。")


def uncovered_questions(conn: sqlite3.Connection, since: float,
                        limit: int = 200, missed: bool = False) -> list[dict]:
    """The questions no article covered since a moment, small talk aside, each text once
    (by its normalised form): how often, by whom, the latest first. `missed`: instead, the
    questions whose answer was given passages and cited none of them, where the search
    may have found the wrong ones."""
    rows = conn.execute(
        "SELECT m.id, m.openid, m.content, m.received_at FROM article_uses u"
        " JOIN messages m ON m.id = u.message_id WHERE u.at >= ? AND "
        + ("u.given > 0 AND u.cited = 0" if missed else "u.given = 0")
        + " ORDER BY u.at DESC LIMIT ?", (since, limit)).fetchall()
    groups: dict[str, dict] = {}
    for row in sorted(rows, key=lambda row: row["received_at"], reverse=True):
        if not row["content"] or small_talk(row["content"]):
            continue
        group = groups.setdefault(normalise(row["content"]), {
            "content": row["content"], "id": row["id"], "openid": row["openid"],
            "received_at": row["received_at"], "count": 0, "openids": set()})
        group["count"] += 1
        group["openids"].add(row["openid"])
    return list(groups.values())


#: What readers say that asks nothing: greetings, thanks, assent. Not worth an article.
SMALL_TALK = frozenset(normalise(word) for word in (
    "你好", "您好", "嗨", "哈喽", "hello", "hi", "在吗", "在不在", "谢谢", "多谢", "谢谢你", "感谢",
    "好的", "好", "嗯", "嗯嗯", "哦", "行", "可以", "收到", "ok", "okay", "哈哈", "哈哈哈", "再见",
    "拜拜", "晚安", "早上好", "早", "晚上好", "中午好", "你是谁", "你叫什么", "测试", "test"))


def small_talk(text: str) -> bool:
    """Whether a message is small talk rather than a question: a greeting or thanks, or
    nothing but emoji and punctuation."""
    word = normalise(text)
    return not word or word in SMALL_TALK or not any(char.isalnum() for char in word)


###############################################################################
# Handing a conversation to a person ##########################################
###############################################################################

#: A reader who asked for a person is told this, once a handoff.
PERSON_LINE = "好的，已经通知了工作人员，会尽快由真人回复你。"
#: WeChat's window for customer-service messages after a reader's message (45015).
WINDOW_SECONDS = 48 * 3600

HANDOFF_SCHEMA = """
-- Readers a person answers: the bot stays quiet for them until `until` (交还机器人 ends it).
CREATE TABLE IF NOT EXISTS handoffs (
    openid     TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    until      REAL NOT NULL,
    asked_at   REAL  -- the reader asked for a person (and was told so) in this handoff
) WITHOUT ROWID;
-- What the owner sent a reader in person, one row a message (segment), on the quota of the
-- reader's message `quota_of`; `note_id`: the owner's note it sent (each reader once).
CREATE TABLE IF NOT EXISTS owner_messages (
    id       INTEGER PRIMARY KEY,
    openid   TEXT NOT NULL,
    content  TEXT NOT NULL,
    sent_at  REAL NOT NULL,
    quota_of INTEGER NOT NULL,
    note_id  INTEGER
);
CREATE INDEX IF NOT EXISTS owner_messages_user ON owner_messages (openid, id);
CREATE UNIQUE INDEX IF NOT EXISTS owner_messages_note ON owner_messages (note_id, openid, id)
    WHERE note_id IS NOT NULL;
-- Readers' messages the bot left to a person (handed off): waiting for the owner.
CREATE TABLE IF NOT EXISTS held_messages (
    message_id INTEGER PRIMARY KEY,
    openid     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS held_messages_user ON held_messages (openid, message_id);
"""


@dataclasses.dataclass(frozen=True)
class Window:
    """What the owner may still send a reader: the message whose quota it uses, how many
    are left of its 5, and when WeChat's 48 h close."""

    message_id: int
    left: int
    closes_at: float


class OwnerSendError(Exception):
    """The owner's message was not sent, or only its first `sent` messages were (`rest`:
    the words that did not go); the text says why, in the owner's words."""

    def __init__(self, text: str, sent: int = 0, rest: str = "", later: bool = False,
                 partial: bool = False):
        super().__init__(text)
        self.sent, self.rest = sent, rest
        self.later = later  # the rest can go only once the reader writes again
        self.partial = partial  # some of it went, or may have


class Handoff:
    """Conversations a person answers: the owner from the console (answer()), or WeChat's
    own 客服 (WXBOT_HANDOFF=wechat). While a reader is handed off the bot answers nothing of
    theirs; what they send is kept, as history the model sees later, and shown to the owner
    as waiting."""

    def __init__(self, settings: Settings, store: Store, notifier: Notifier | None = None):
        self.settings, self.store, self.notifier = settings, store, notifier
        with store.transaction() as conn:
            upgrade_tables(conn, HANDOFF_SCHEMA)
        # When the last handoff ends, at the latest: until then a push's reader is looked up;
        # after it (most accounts, most of the time) a push reads nothing but, every LOOK
        # seconds, when that is (a handoff begun by another Handoff on the database).
        self._latest, self._looked = 0.0, -math.inf
        # Guards what is kept in memory: _latest, _asking and _sent_once.
        self._memory = threading.Lock()
        self._asking: dict[str, float] = {}  # reader -> when their 转人工 came (asking())
        # The owner's sends to a reader one at a time (a lock for each of SENDING readers'
        # groups, so that a note going to many keeps no other reader waiting): a second press
        # of 发送 (the same form, `once`) or of a note's 发给这些读者 sees what the first sent,
        # and the reader gets it once.
        self._sending = [threading.Lock() for _ in range(self.SENDING)]
        self._sent_once: dict[tuple[str, str], int] = {}  # (reader, a form's once) -> sent

    #: How often the end of the last handoff is read again while none holds anyone (s).
    LOOK = 5.0

    def holds(self, openid: str, now: float, since: float | None = None) -> bool:
        """Whether the bot leaves this reader to a person now; `since`: when a stored message
        came (a push comes now). A reader whose 转人工 no worker has taken yet is left to the
        person from it on: what they sent before it is answered as before (asking())."""
        asked_at = self._asking.get(openid)
        if asked_at is not None and now - asked_at < self.ASKING_SECONDS and \
                (since is None or since >= asked_at):
            return True
        if now >= self._latest and time.monotonic() < self._looked + self.LOOK:
            return False
        with self.store.connection() as conn:
            if now >= self._latest:
                looked = time.monotonic()
                self._later(conn.execute("SELECT max(until) FROM handoffs").fetchone()[0] or 0.0)
                self._looked = looked
                if now >= self._latest:
                    return False
            return conn.execute("SELECT 1 FROM handoffs WHERE openid = ? AND until > ?",
                                (openid, now)).fetchone() is not None

    def _later(self, until: float) -> None:
        with self._memory:  # a read of the table never undoes a handoff just begun
            self._latest = max(self._latest, until)

    def until(self, openid: str, now: float) -> float | None:
        with self.store.connection() as conn:
            row = conn.execute("SELECT until FROM handoffs WHERE openid = ? AND until > ?",
                               (openid, now)).fetchone()
        return row[0] if row else None

    def _begin(self, conn: sqlite3.Connection, openid: str, now: float) -> None:
        until = now + self.settings.handoff_hours * 3600
        self._later(until)  # before the commit: never behind the table
        conn.execute("INSERT INTO handoffs (openid, started_at, until) VALUES (?, ?, ?)"
                     " ON CONFLICT (openid) DO UPDATE SET until = excluded.until,"
                     " started_at = CASE WHEN until > excluded.started_at THEN started_at"
                     " ELSE excluded.started_at END, asked_at = CASE WHEN until >"
                     " excluded.started_at THEN asked_at END",
                     (openid, now, until))

    #: Readers whose 转人工 waits for a worker, at most (the oldest forgotten first), and
    #: for how long (s): a worker takes a message that needs no model within seconds.
    ASKING_MOST, ASKING_SECONDS = 10000, 900.0

    def asking(self, openid: str, now: float) -> None:
        """A reader's 转人工 arrived (the webhook): what they send from now on is left to the
        person though no worker has taken it yet (with WXBOT_HANDOFF=wechat it goes to WeChat's
        客服); the worker then begins the handoff and tells them and the owner (asked()). Kept
        in memory, no write while WeChat waits: after a restart the queued 转人工 begins it."""
        with self._memory:
            if openid not in self._asking and len(self._asking) >= self.ASKING_MOST:
                del self._asking[next(iter(self._asking))]
            self._asking.setdefault(openid, now)

    def give_back(self, openid: str) -> bool:
        """交还机器人: the bot answers this reader again from their next message."""
        with self._memory:
            self._asking.pop(openid, None)
        with self.store.transaction() as conn:
            return conn.execute("DELETE FROM handoffs WHERE openid = ?", (openid,)).rowcount > 0

    def asked(self, message: Message, now: float) -> bool:
        """A reader asked for a person: the bot goes quiet for them; True when they are to
        be told so (once a handoff), and then the owner is told too."""
        with self.store.transaction() as conn:
            self._begin(conn, message.openid, now)
            told = conn.execute("UPDATE handoffs SET asked_at = ? WHERE openid = ? AND asked_at"
                                " IS NULL", (now, message.openid)).rowcount > 0
            self._hold(conn, message)
        with self._memory:  # in the table now
            self._asking.pop(message.openid, None)
        if told and self.notifier:
            self.notifier.tell("person", f"读者 {short_id(message.openid)} 说「"
                                         f"{(message.content or '')[:100]}」，等你回复。")
        return told

    def hold(self, message: Message) -> None:
        """A handed-off reader's message: kept for the owner, and for the model later."""
        with self.store.transaction() as conn:
            self._hold(conn, message)

    @staticmethod
    def _hold(conn: sqlite3.Connection, message: Message) -> None:
        conn.execute("INSERT OR IGNORE INTO held_messages (message_id, openid) VALUES (?, ?)",
                     (message.id, message.openid))
        if message.content:
            conn.execute("INSERT INTO turns (openid, role, content, created_at, message_id)"
                         " VALUES (?, 'user', ?, ?, ?)", (message.openid, message.content,
                                                          message.received_at, message.id))

    def window(self, openid: str, now: float) -> Window | None:
        """What may still be sent this reader by the customer-service API (45015, 45047);
        None when WeChat's window is closed."""
        with self.store.connection() as conn:
            row = conn.execute(
                "SELECT id, msg_type, received_at FROM messages WHERE openid = ? AND"
                " msg_type != 'event' ORDER BY received_at DESC, id DESC LIMIT 1",
                (openid,)).fetchone()
            if row is None or row["received_at"] + WINDOW_SECONDS <= now:
                return None
            sent = conn.execute("SELECT count(*) FROM segments WHERE message_id = ? AND"
                                " sent_at IS NOT NULL", (row["id"],)).fetchone()[0]
        quota = self.store.quota(Message(row["id"], openid, row["msg_type"], None, None, None,
                                         {}, row["received_at"], 0, 0, 0, 0))
        return Window(row["id"], max(0, quota - sent), row["received_at"] + WINDOW_SECONDS)

    #: Locks for the owner's sends, and forms (`once`) remembered as sent.
    SENDING, SENT_ONCE_KEPT = 64, 1000

    def answer(self, wechat: "WeChatAPI", openid: str, text: str, now: float,
               note_id: int | None = None, once: str = "") -> int:
        """Send the owner's text to a reader as customer-service messages (split as answers
        are), each stored as it goes; the owner's words join the turns the model sees. A
        message written in person (not a note) hands the reader to the owner. Returns how
        many messages went; OwnerSendError says why none could, or which went (`partial`:
        the first, and perhaps the next, which WeChat did not answer) and what did not (its
        `rest`, as written). The same form sent again (`once`: a double click), or a note the
        reader has, goes no second time: what went is counted as sent; a note that went in
        part goes on from where it stopped."""
        segments = owner_segments(text)
        if not segments:
            raise OwnerSendError("没有内容可发送")
        with self._sending[hash(openid) % self.SENDING]:
            if once and (openid, once) in self._sent_once:
                went = self._sent_once[openid, once]
                if isinstance(went, tuple):  # what went in part, as the first press was told
                    raise OwnerSendError(*went)
                return went
            if note_id is not None:
                done = self.note_sent(note_id, openid)
                if done >= len(segments):
                    return 1
                segments = segments[done:]  # a note that went in part goes on from there
            try:
                went = sent = self._answer(wechat, openid, text.strip(), segments, now, note_id)
            except OwnerSendError as error:
                if not error.partial:
                    raise
                went = (str(error), error.sent, error.rest, error.later, True)
            if once:
                with self._memory:
                    if len(self._sent_once) >= self.SENT_ONCE_KEPT:
                        del self._sent_once[next(iter(self._sent_once))]
                    self._sent_once[openid, once] = went
            if isinstance(went, tuple):
                raise OwnerSendError(*went)
            return sent

    def _answer(self, wechat: "WeChatAPI", openid: str, text: str, segments: list[str],
                now: float, note_id: int | None) -> int:
        window = self.window(openid, now)
        if window is None:
            raise OwnerSendError("读者最后一条消息已超过 48 小时，微信不再允许发给他，"
                                 "等他再发消息后才能回复")
        if len(segments) > window.left:
            raise OwnerSendError(f"这条要分 {len(segments)} 条发送，但读者这条消息的 5 条额度只剩 "
                                 f"{window.left} 条：请写短一些，或等读者再发消息")
        sent, refused = 0, None
        for segment in segments:
            try:
                wechat.customer_service_send(openid, segment)
            except WeChatError as error:
                if not sent and error.declined:
                    raise OwnerSendError(owner_send_problem(error)) from error
                refused = error  # refused, or perhaps taken: WeChat did not answer
                break
            with self.store.transaction() as conn:
                conn.execute("INSERT INTO owner_messages (openid, content, sent_at, quota_of,"
                             " note_id) VALUES (?, ?, ?, ?, ?)",
                             (openid, segment, now, window.message_id,
                              note_id))
                Store.use_quota(conn, window.message_id, 1, now)
            sent += 1
        if sent:
            with self.store.transaction() as conn:
                conn.execute("INSERT INTO turns (openid, role, content, created_at,"
                             " message_id) VALUES (?, 'assistant', ?, ?, NULL)",
                             (openid, "".join(segments[:sent]), now))
                if note_id is None:
                    self._begin(conn, openid, now)
            log.info("the owner sent %s %d message(s)%s", short_id(openid), sent,
                     f" of note {note_id}" if note_id else " in person")
        if refused is None:
            return sent
        unsure = not refused.declined  # the next one may have reached the reader
        rest = rest_after(text, segments, sent + unsure)
        log.warning("the owner's message to %s went in part: %d of %d sent; the next %s (%s)",
                    short_id(openid), sent, len(segments),
                    "may have arrived: WeChat did not answer" if unsure else
                    "was refused", refused)
        said = [f"给读者 {short_id(openid)} 的 {len(segments)} 条中"
                + (f"只发出了前 {sent} 条" if sent else "")]
        if unsure:
            said.append(f"第 {sent + 1} 条微信没有回应，可能已经发出（不在下面的框里，可以问读者"
                        f"是否收到）")
        if rest:
            said.append("其余没有发出")
        raise OwnerSendError("，".join(said) + "：" + owner_send_problem(refused), sent, rest,
                             later=refused.errcode in (45015, 45047), partial=True)

    def owner_messages(self, openid: str, after: float) -> list[sqlite3.Row]:
        with self.store.connection() as conn:
            return conn.execute("SELECT content, sent_at, note_id FROM owner_messages"
                                " WHERE openid = ? AND sent_at >= ? ORDER BY id LIMIT 500",
                                (openid, after)).fetchall()

    def waiting(self, openid: str) -> set[int]:
        """The held messages of this reader that no message of the owner's followed."""
        with self.store.connection() as conn:
            last = conn.execute("SELECT max(sent_at) FROM owner_messages WHERE openid = ?",
                                (openid,)).fetchone()[0] or 0
            return {row[0] for row in conn.execute(
                "SELECT h.message_id FROM held_messages h JOIN messages m ON"
                " m.id = h.message_id WHERE h.openid = ? AND m.received_at > ?",
                (openid, last))}

    def note_sent(self, note_id: int, openid: str) -> int:
        """How many of a note's messages the reader was sent."""
        with self.store.connection() as conn:
            return conn.execute("SELECT count(*) FROM owner_messages WHERE note_id = ? AND"
                                " openid = ?", (note_id, openid)).fetchone()[0]

    def sent_note(self, note_id: int, openid: str, text: str) -> bool:
        """Whether the reader was sent all of a note (its `text`) as answer() sends it: one
        that went in part goes on from where it stopped."""
        return self.note_sent(note_id, openid) >= len(owner_segments(text))


def owner_segments(text: str) -> list[str]:
    """The messages an owner's text (or a note) goes as: cut as answers are, not Markdown."""
    return split_segments(text.strip(), markdown=False)


def rest_after(text: str, segments: list[str], went: int) -> str:
    """The text after its first `went` segments (split_segments() cut it there, dropping
    the spaces at each cut), as it was written: its lines and paragraphs kept."""
    at = 0
    for segment in segments[:went]:
        found = text.find(segment, at)
        if found < 0:  # not cut as written: the segments left, as they are
            return "".join(segments[went:])
        at = found + len(segment)
    return text[at:].strip()


def owner_send_problem(error: "WeChatError") -> str:
    """Why WeChat refused the owner's message, in the owner's words."""
    if error.errcode == 45015:
        return "读者已超过 48 小时没有发消息（或已取消关注），微信不允许再发给他"
    if error.errcode == 45047:
        return "读者这条消息的 5 条额度已用完，等他再发消息后才能回复"
    if error.errcode == 48001:
        return "这个公众号没有客服消息权限（需要微信认证），只能在公众号后台回复"
    return f"微信拒绝了这条消息（错误码 {error.errcode}）" if error.errcode else \
        "暂时连不上微信，请稍后再试"


###############################################################################
# Model outages: questions held until the model is back #######################
###############################################################################

OUTAGE_SCHEMA = """
-- The questions held while the model fails for everyone: parked in the queue (not_before at
-- the end of their WXBOT_HOLD) until an answer shows the model is back.
CREATE TABLE IF NOT EXISTS held_questions (
    message_id INTEGER PRIMARY KEY,
    openid     TEXT NOT NULL,
    held_at    REAL NOT NULL,
    told_at    REAL,  -- its reader was told (HOLD_LINE): once a reader and outage
    probed_at  REAL   -- when it was last the one question tried
);
CREATE INDEX IF NOT EXISTS held_questions_user ON held_questions (openid)
    WHERE told_at IS NOT NULL;
"""


class Outage:
    """Whether the model fails for everyone, and the questions held while it does.

    One question's failure is tried again a few times, then apologised for. But when the
    provider fails (OUTAGE_SIGNS: no connection, no first byte, a stalled stream, its 5xx;
    not its 429, which says it is up) OUTAGE_AFTER times in a row and for a retry base (2 s) at least, with no answer in
    between, for two questions or more (or with no connection at all, which no question
    causes), an apology helps no one: a reader would rather have the answer late. (A
    provider failing now and then answers in between: no outage.) So questions are held:
    parked in the queue, each reader told once (HOLD_LINE), and one question at a time is
    tried, paced from WXBOT_RETRY_BASE doubling up to PROBE_MOST (a model that is down is not
    asked 3 times a message). The first answer ends the outage: the held questions go back to
    the queue in their order, each asked once more. A question still held after WXBOT_HOLD
    gets the apology. The held questions are in the database: a restart goes on with them.
    The log has one line when it begins, one a minute with counts while it lasts (the held
    questions say nothing of their own), and one when it ends. The owner (WXBOT_NOTIFY_URL)
    is told when it begins, after 10 minutes, then hourly, and when it ends. WXBOT_HOLD=0
    holds nothing (each question is tried and apologised for as before): the outage is only
    told.
    """

    OUTAGE_AFTER = 3
    #: The longest pause between two tries of the model while it is down, in retry bases.
    PROBE_MOST = 30
    #: Seconds between two lines of the log while it lasts.
    REPORT_EVERY = 60.0
    #: When the owner is told it lasts, in seconds from its start: these, then every hour.
    NOTICES = (0.0, 600.0)
    NOTICE_EVERY = 3600.0

    def __init__(self, settings: Settings, store: Store, notifier: "Notifier | None" = None):
        self.settings, self.store, self.notifier = settings, store, notifier
        self.notices = 0       # the owner told this many times in this outage
        self._lock = threading.Lock()
        self.in_row = 0        # outage signs since the last answer
        self.failing: set[int] = set()  # the messages they came from
        self.run_began = 0.0   # when the first of them came
        self.probing: int | None = None  # the message tried now, while down
        self.probe_started = 0.0
        self.probe_longest = settings.model_timeout * 2 + 120  # as a worker's lease
        self.probe_at = 0.0    # when the next one may be
        self.offered = -1.0    # the probe_at for which a held question was put back in line
        self.probes = 0        # tries failed since it began
        self.apologised = 0    # questions held past WXBOT_HOLD since it began
        self.last: ModelError | None = None
        self.down_since: float | None = None
        self.reported_at = 0.0
        with store.transaction() as conn:
            upgrade_tables(conn, OUTAGE_SCHEMA)
            since = conn.execute("SELECT min(held_at) FROM held_questions").fetchone()[0]
        if since is not None:  # stopped during an outage: it goes on, the model tried at once
            self.down_since, self.reported_at = since, time.time()
            while self._notice_at(self.notices) <= self.reported_at - since:
                self.notices += 1  # told before the stop
            log_model.warning("questions were held for the model at the last stop: trying it "
                              "again now")

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def _pause(self) -> float:
        base = self.settings.retry_base
        return min(base * 2 ** self.probes, base * self.PROBE_MOST)

    def _notice_at(self, notices: int) -> float:
        """Seconds from its start when the owner is told of the outage once more."""
        if notices < len(self.NOTICES):
            return self.NOTICES[notices]
        return self.NOTICE_EVERY * (notices - len(self.NOTICES) + 1)

    def _tell_owner(self, now: float) -> None:
        """Tell the owner the model is down, when a notice is due (NOTICES)."""
        with self._lock:
            since, last = self.down_since, self.last
            if self.notifier is None or since is None or \
                    now - since < self._notice_at(self.notices):
                return
            self.notices += 1
        minutes = round((now - since) / 60)
        self.notifier.tell("model", "".join((
            f"模型已连续失败 {minutes} 分钟" if minutes else "模型对所有提问都失败了",
            "，读者的提问暂存到恢复后回答" if self.settings.hold else "，读者收到道歉",
            f"：{str(last or '停止前已失败')[:200]}")))

    def admit(self, message: Message, now: float) -> bool:
        """Whether the model may be asked for this message now: it is up, or this is the one
        try while it is down (the first to come once the pause is over)."""
        with self._lock:
            if self.down_since is None or self.probing == message.id or not self.settings.hold:
                return True
            if self.probing is not None and now > self.probe_started + self.probe_longest:
                self.probing = None  # its worker never said how it went (stopped, a bug)
            if self.probing is None and now >= self.probe_at:
                self.probing, self.probe_started = message.id, now
                return True
            return False

    def failed(self, message: Message, error: ModelError, now: float) -> bool:
        """A model call failed; True when the model is down for everyone: hold the question."""
        # A rate limit says the provider is up and busy: a burst of 429s while other answers
        # stream is no outage (each question is retried with its own backoff).
        if error.failed not in OUTAGE_SIGNS or error.failed == "rate limited":
            return False
        with self._lock:
            if not self.in_row:
                self.run_began = now
            self.in_row += 1
            self.failing.add(message.id)
            self.last = error
            if self.probing == message.id:
                self.probing, self.probes = None, self.probes + 1
                self.probe_at = now + self._pause()
            if self.down_since is None and self.in_row >= self.OUTAGE_AFTER and \
                    now - self.run_began >= self.settings.retry_base and (
                    len(self.failing) > 1 or error.failed == "no connection"):
                self.down_since = self.reported_at = now
                self.probes, self.apologised, self.notices = 0, 0, 0
                self.probe_at = now + self._pause()
                log_model.error("the model fails for everyone: %d calls in a row, the last %s; "
                                "%s", self.in_row, error,
                                "questions are held (each reader is told once) and answered "
                                f"when it is back, or apologised for after WXBOT_HOLD "
                                f"({age_text(self.settings.hold)})" if self.settings.hold else
                                "each question gets the apology (WXBOT_HOLD=0)")
            down = self.down_since is not None
        self._tell_owner(now)
        return down and self.settings.hold > 0

    def answered(self, now: float) -> bool:
        """A model call answered: an outage is over. True when held questions went back to
        the queue (the workers are to be woken)."""
        with self._lock:
            self.in_row = 0
            self.failing.clear()
            since, self.down_since, self.probing = self.down_since, None, None
        if since is None:
            return False
        with self.store.transaction() as conn:  # after any hold in progress: none is left
            back = conn.execute("UPDATE messages SET not_before = 0, model_failures = 0 WHERE"
                                " id IN (SELECT message_id FROM held_questions) AND"
                                " state = 'queued'").rowcount
            conn.execute("DELETE FROM held_questions")
        log_model.warning("the model answers again after %s: %d held question(s) are answered "
                          "now, in order; %d were apologised for after WXBOT_HOLD",
                          age_text(now - since), back, self.apologised)
        if self.notifier:
            self.notifier.tell("model_back", f"模型在中断 {round((now - since) / 60)} 分钟后恢复"
                                             f"：{back} 个暂存的提问现在回答。")
        return True

    def hold(self, message: Message, now: float) -> bool | None:
        """Park the message until the end of its WXBOT_HOLD (or the model's return). Whether
        to tell its reader: the first question of theirs held in this outage, and no line
        yet before its answer (one of the 5: note_queue_lines). None: the model is back."""
        with self.store.transaction() as conn:
            if self.down_since is None:  # answered() ran, or runs next and un-parks this one
                return None
            self.store.release(message, message.received_at + self.settings.hold,
                               f"held: the model is down ({self.last or 'at the last stop'})",
                               None)
            conn.execute("INSERT OR IGNORE INTO held_questions (message_id, openid, held_at)"
                         " VALUES (?, ?, ?)", (message.id, message.openid, now))
            if conn.execute("SELECT 1 FROM held_questions WHERE openid = ? AND told_at IS"
                            " NOT NULL", (message.openid,)).fetchone() or \
                    not self.store.note_queue_lines([message.id], now):
                return False
            conn.execute("UPDATE held_questions SET told_at = ? WHERE message_id = ?",
                         (now, message.id))
            return True

    def held(self) -> int:
        """How many questions are held now."""
        with self.store.connection() as conn:
            return conn.execute("SELECT count(*) FROM held_questions").fetchone()[0]

    def gave_up(self, message: Message) -> None:
        """The message was held past WXBOT_HOLD: it gets the apology."""
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM held_questions WHERE message_id = ?", (message.id,))
        with self._lock:
            self.apologised += 1

    def tick(self, now: float) -> float | None:
        """While the model is down: the line of the minute, and a held question put back in
        line when the next try is due. Seconds until there is more to do; None when up."""
        with self._lock:
            if self.down_since is None:
                return None
            report = now >= self.reported_at + self.REPORT_EVERY
            if report:
                self.reported_at = now
            offer = self.probing is None and now >= self.probe_at and \
                self.offered != self.probe_at
            if offer:
                self.offered = self.probe_at
            since, last = self.down_since, self.last
        if offer:  # the one tried least lately, oldest first: one question the model
            with self.store.transaction() as conn:  # fails on cannot hold the others back
                row = conn.execute(
                    "SELECT h.message_id FROM held_questions h JOIN messages m ON m.id ="
                    " h.message_id WHERE m.state = 'queued' ORDER BY h.probed_at IS NOT NULL,"
                    " h.probed_at, h.message_id LIMIT 1").fetchone()
                if row:
                    conn.execute("UPDATE held_questions SET probed_at = ? WHERE message_id = ?",
                                 (now, row[0]))
                    conn.execute("UPDATE messages SET not_before = 0 WHERE id = ?", (row[0],))
        self._tell_owner(now)
        if report:
            with self.store.connection() as conn:
                held, told = conn.execute("SELECT count(*), count(told_at) FROM"
                                          " held_questions").fetchone()
            log_model.error("the model is still down after %s: %d question(s) held, %d "
                            "reader(s) told, %d tries failed, %d apologised for after "
                            "WXBOT_HOLD; the last failure: %s", age_text(now - since), held,
                            told, self.probes, self.apologised, last or "before the last stop")
        with self._lock:
            waits = [self.reported_at + self.REPORT_EVERY - now]
            if self.probing is None and self.offered != self.probe_at:
                waits.append(self.probe_at - now)
            return 0.0 if offer else max(0.01, min(waits))


###############################################################################
# Worker ######################################################################
###############################################################################

#: /stats counts the questions answered from the articles over this many seconds (7 days).
ARTICLE_USES_SECONDS = 7 * 86400


def stats_text(stats: dict) -> str:
    """/stats for an admin, in the owner's words; with the articles learned and how they were
    used when the worker has them."""
    token = stats["token_valid_s"]
    return "\n".join([
        f"排队中：{stats['queued']}（处理中 {stats['in_progress']}，最久 "
        f"{stats['oldest_queued_age_s']:.0f} 秒）",
        f"今日消息：{stats['today']}，失败：{stats['failed_today']}，放弃：{stats['dead_today']}",
        f"平均回答用时：{stats['answer_seconds_avg']} 秒",
        f"access token：{'剩余 %d 秒' % token if token and token > 0 else '未获取或已过期'}",
        f"未发送的分段：{stats['unsent_segments']}",
        f"回复方式：{'被动回复' if stats['mode'] == 'passive' else '客服消息'}",
        f"今日固定回复：关键词 {stats['keyword_replies_today']}，菜单 "
        f"{stats['click_replies_today']}；拦截的提问：{stats['blocked_today']}",
        *([] if "articles" not in stats else [
            "已学文章：{} 篇；近 7 天 {} 个提问中，找到相关段落 {} 个，引用文章回答 {} 个".format(
                stats["articles"], *stats["article_uses"])])])


def help_answer(drawing: bool, vision: bool) -> str:
    """/help's answer: HELP_LINE, saying how to ask for a picture when drawing is on, and
    that a photo may be sent when the model sees pictures (WXBOT_VISION)."""
    first, rest = HELP_LINE.split("\n", 1)
    extra = [line for line, on in ((HELP_VISION_LINE, vision), (HELP_DRAW_LINE, drawing)) if on]
    return "\n".join([first, *extra, rest])


def image_media_id(store: Store, wechat: WeChatAPI, image_id: int) -> str | None:
    """A drawn picture's media_id, uploaded now if it never was or has expired (3 days), and
    stored before it is used; None when its bytes are gone (it went out long ago)."""
    image = store.image(image_id)
    if image is None:
        return None
    if image["media_id"] and image["uploaded_at"] > time.time() - MEDIA_LIFETIME:
        return image["media_id"]
    if image["bytes"] is None:
        return None
    now = time.time()
    media_id = wechat.upload_image(image["bytes"])
    store.keep_media(image_id, media_id, now)
    return media_id


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
    #: Delivery gives up (state dead) after this many failed tries to send one message.
    DELIVERY_TRIES = 10
    #: Seconds between tries to write while the disk is full.
    DISK_FULL_PAUSE = 5.0
    #: An idle worker looks at the queue this often even when nothing wakes it.
    IDLE_LOOK = 60.0
    #: Whether it takes only messages whose answer is stored whole, ready to send (Sender).
    READY_ONLY = False
    #: Where answers, model and WeChat errors and timings are counted (Bot sets it).
    metrics: "Metrics | None" = None

    def __init__(self, settings: Settings, store: Store, wechat: WeChatAPI, model: Model,
                 wakeup: Wakeup, mode: DeliveryMode, name: str = "worker",
                 owner: OwnerFiles | None = None, acknowledger: Acknowledger | None = None,
                 others: Wakeup | None = None, articles: Articles | None = None,
                 handoff: Handoff | None = None, notifier: Notifier | None = None,
                 outage: Outage | None = None):
        self.settings, self.store, self.wechat, self.model = settings, store, wechat, model
        self.handoff, self.notifier = handoff, notifier
        self.outage = outage  # shared by the workers; None: no question is held (chat)
        self.articles = articles  # the account's own, searched for each question
        # Their use is counted beside the messages it names: `chat` searches the server's
        # articles, but its messages are its own and stay out of /stats.
        self.counts_uses = articles is not None and articles.path == store.path
        self.wakeup, self.mode, self.name = wakeup, mode, name
        self.others = others  # the threads of the other kind (workers, senders)
        self.acknowledger = acknowledger
        self.owner = owner or OwnerFiles(settings)
        self.image_model = ImageModel(settings) if settings.image_model else None
        self.stopping = threading.Event()
        self.lease_seconds = settings.model_timeout * 2 + 120

    # Loop -------------------------------------------------------------------

    def loop(self, now: float | None = None) -> bool:
        """Claim and handle one message; False when nothing was due."""
        message = self.store.claim(time.time() if now is None else now, self.lease_seconds,
                                   self.READY_ONLY)
        if message is None:
            return False
        try:
            self.handle(message)
            # The user's next message, if any, may now be claimed, by either kind of thread.
            self.wakeup.notify()
            if self.others:
                self.others.notify()
        except LeaseLost:
            log_worker.warning("message %s: lease lost, another worker has it", message.id)
        except Exception as error:  # one bad message never kills the thread
            if disk_full(error):
                self._hold_until_room(message)
                return True
            delay = self._backoff(message.interruptions + 1)
            log_worker.exception("message %s: unexpected error; retry in %.1f s", message.id,
                                 delay)
            with contextlib.suppress(LeaseLost, sqlite3.Error):
                self.store.interrupt(message, time.time() + delay,
                                     f"an internal error ({type(error).__name__})")
        return True

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.store.disk_full and not self._room_again():
                continue
            try:
                if self.loop():
                    continue
                due = self.store.next_due(time.time(), self.READY_ONLY)
            except sqlite3.Error as error:
                if not disk_full(error):
                    log_worker.error("database error: %s; retrying in 1 s", error)
                due = time.time() + 1
            # Another process (`wxbot.py retry`) may queue a message: look once a minute.
            timeout = max(0.01, min(due - time.time(), self.IDLE_LOOK)) if due else \
                self.IDLE_LOOK
            if self.outage and not self.READY_ONLY:  # the model tried again when due
                with contextlib.suppress(sqlite3.Error):
                    wait = self.outage.tick(time.time())
                    if wait is not None and wait < timeout:
                        timeout = wait
                if timeout <= 0:
                    continue
            self.wakeup.wait(timeout)

    def _room_again(self) -> bool:
        """While the disk is full, wait; True once a write that needs space succeeds."""
        self.stopping.wait(self.DISK_FULL_PAUSE)
        with contextlib.suppress(sqlite3.Error):
            return self.store.has_room()
        return False

    def _hold_until_room(self, message: Message) -> None:
        """The disk filled up while this message was in hand: no fault of the message's, so
        it goes back uncounted once there is room (what was not stored is asked again)."""
        while not self.stopping.is_set():
            if self._room_again():
                with contextlib.suppress(LeaseLost, sqlite3.Error):
                    self.store.release(message, time.time(), "the disk was full", None)
                return

    def stop(self) -> None:
        self.stopping.set()

    def _backoff(self, failures: int) -> float:
        """The delay before the next try after `failures` failures of one kind."""
        delay = self.settings.retry_base * 2 ** max(0, failures - 1)
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
        how = route(self.settings, self.owner.replies, message, self.owner.blocked,
                    self.handoff)
        if how.route is Route.HELD:
            self.handoff.hold(message)
            log_worker.info("message %s from %s: left to a person (handed off)", message.id,
                            short_id(message.openid))
            return self.store.save_answer(message, [], now, carry=False)
        if how.route is Route.PERSON:
            told = self.handoff.asked(message, now) if self.handoff else False
            return self.store.save_answer(message, [PERSON_LINE] if told else [], now,
                                          carry=False)
        if how.route is Route.FIXED:  # no model, and no count against the user's limits
            planned = self.store.save_answer(message, [how.text], now,
                                             carry=message.msg_type != "event")
            self.store.bump(how.counter, now)
            return planned
        if how.route is Route.PROMPT or how.route is Route.QUESTION:
            return self.answer_text(message, how.text)
        if how.route is Route.PICTURE:
            return self.answer_text(message, "", how.picture)
        if how.route is Route.DRAW:
            return self.draw(message, how.text)
        if how.route is Route.BLOCKED:
            return self._refuse(message)
        if how.route is Route.EVENT:  # LOCATION (every 5 s), VIEW and the rest: nothing
            line = self.settings.welcome if message.event == "subscribe" else ""
            return self.store.save_answer(message, split_segments(line, markdown=False), now,
                                          carry=False)
        if how.route is Route.RESET:
            self.store.forget(message.openid, message.id)
            return self.store.save_answer(message, [RESET_LINE], now, leftovers=Leftovers.DROP)
        if how.route is Route.HELP:
            return self.store.save_answer(message, [help_answer(
                bool(self.settings.image_model), self.settings.vision)], now)
        if how.route is Route.STATS:
            articles = {} if not self.articles else {
                "articles": len(self.articles.sources()),
                "article_uses": self.articles.uses_since(now - ARTICLE_USES_SECONDS)}
            return self.store.save_answer(message, [stats_text(
                {**self.store.stats(now), "mode": self.mode.in_force, **articles})], now)
        tapped = message.fields.get("bizmsgmenuid", "")
        if how.route is Route.CONTINUE and tapped and \
                not self.store.tap_current(message, tapped):
            return self.store.save_answer(message, [STALE_CONTINUE_LINE], now)
        if how.route is Route.CONTINUE:  # fetches the rest; never a question for the model
            return self.store.save_answer(message, [], now, leftovers=Leftovers.TAKE,
                                          if_nothing=[NOTHING_MORE_LINE])
        if how.route is Route.UNHEARD:
            log_worker.warning("message %s: a voice message without Recognition; turn on "
                               "公众号后台 → 设置与开发 → 接口权限 → 接收语音识别结果", message.id)
            return self.store.save_answer(message, [VOICE_UNRECOGNISED_LINE], now)
        if how.route is Route.DRAW_HOW:
            return self.store.save_answer(message, [DRAW_HOW_LINE], now)
        return self.store.save_answer(message, [TEXT_ONLY_LINE], now)  # Route.TEXT_ONLY

    def answer_text(self, message: Message, question: str, picture: str = "") -> int | None:
        """Ask the model, streaming: segments are stored and sent while it writes.

        A picture (WXBOT_VISION) goes as an image part, with the texts that follow it or, on
        its own, a short instruction.
        """
        if self.outage and not self.outage.admit(message, time.time()):
            return self._held(message)  # the model is down: another question tries it
        blocked = self.owner.blocked
        with self.store.transaction():  # one commit: follow-ups, the call counted, carried
            question = "\n".join(part for part in [question, *self.store.merge_followups(
                message, time.time(), self.owner.replies.keywords,
                bool(self.settings.image_model), person_words(self.settings))] if part) \
                or IMAGE_PROMPT
            if len(question) > MAX_QUESTION_CHARS:
                question = question[:MAX_QUESTION_CHARS] + TRUNCATED_NOTE.format(
                    chars=MAX_QUESTION_CHARS)
            # A blocked question never reaches the model, nor counts against the limits.
            refused = blocked.found(question)
            wait = None if refused else self.store.count_model_call(message, time.time(), [
                (60, self.settings.user_rate), (86400, self.settings.user_daily)])
            if not refused and wait is None:
                # A menu click's answer opens no quota that earlier answers could use.
                self.store.start_answer(message, carry=message.msg_type != "event",
                                        leftovers=Leftovers.DROP)
        if refused:  # a follow-up asked with it has a blocked word
            return self._refuse(message)
        if wait is not None:
            return self._over_limit(message, wait)
        history = self.store.history(message.openid, self.settings.history_turns,
                                     self.settings.context_chars,
                                     time.time() - self.settings.session_ttl)
        passages = self._passages(message, question, history) if question != IMAGE_PROMPT \
            else []
        asked = with_passages(question, passages)
        ask = [{"role": "user", "content": asked if not picture else [
            {"type": "text", "text": asked},
            {"type": "image_url", "image_url": {"url": picture}}]}]
        partial = self.store.partial_answer(message.id)
        if partial:  # a stream cut off before: ask for the rest, never for all of it again
            ask += [{"role": "assistant", "content": partial},
                    {"role": "user", "content": RESUME_PROMPT}]
        cutter = StreamCutter(first_done=bool(partial), closing=self._closing(message))
        written, sending = [], True
        deadline = Deadline(self.settings.model_timeout)
        system = self.settings.system_prompt + ("\n\n" + ARTICLES_PROMPT if passages else "")
        citations = Citations(passages)
        pieces = masked_stream(self._watched(message, self._ask(system, history, ask, deadline),
                                             deadline), blocked)
        try:
            for text in cited_stream(pieces, citations) if passages else pieces:
                written.append(text)
                ready = cutter.feed(text)
                if ready and sending:
                    sending = self.deliver(message, streaming=True, add=ready)
                elif ready:  # after a failed send, the rest waits for the end of the answer
                    self.store.add_segments(message, ready)
            rest, card = self._last_segments(message, cutter, citations)
        except ModelError as error:
            self.store.add_segments(message, cutter.finish())
            return self._model_failed(message, error, question, cited=citations.sources())
        answer = "\n\n".join(part for part in (partial, "".join(written).strip()) if part)
        planned = self.store.complete_answer(message, time.time(), rest,
                                             f"[图片] {question}" if picture else question,
                                             answer, card=card)
        if self.outage and self.outage.answered(time.time()):
            self.wakeup.notify_all()  # the held questions are in the queue again
        if self.counts_uses:
            self.articles.note_use(message.id, time.time(), len(passages), len(citations.cited))
        return planned

    def _last_segments(self, message: Message, cutter: StreamCutter, citations: Citations
                       ) -> tuple[list[str], Card | None]:
        """The answer's last segments, the 来源 line ending them as any of its text would;
        and the card of the first article cited that has one (Articles.card), when a message
        of the quota is still free after them all: it never takes the place of the answer's
        text, nor the last message, which tells of the rest (继续). That article then leaves
        the 来源 line. A passive reply is one message, the text: no card."""
        card = self.articles.card(list(dict.fromkeys(
            citations.passages[index].source_id for index in citations.cited))) \
            if self.articles and citations.cited and self.mode.sends(message.id) else None
        if card:
            trial = copy.deepcopy(cutter)
            rest = trial.finish(citations.sources(carded=card.source_id))
            if len(rest) < self.store.answer_room(message):
                return rest, card
        return cutter.finish(citations.sources()), None

    def _passages(self, message: Message, question: str, history: list[dict]) -> list[Passage]:
        """The passages of the account's articles that answer the question, searched with the
        user's questions before it (a follow-up: 那哪种最少？); [] when none does."""
        if not self.articles:
            return []
        earlier = [turn["content"] for turn in history if turn["role"] == "user"]
        try:
            passages = self.articles.find(question, earlier, self.model.search_words
                                          if self.settings.search_words else None)
            if self.metrics:
                self.metrics.count("wxbot_article_searches_total")
                self.metrics.count("wxbot_article_search_hits_total", amount=bool(passages))
            return passages
        except sqlite3.Error as error:  # the articles are no reason to leave a user unanswered
            log_worker.error("message %s: the articles could not be searched (%s); answering "
                             "without them", message.id, error)
            return []
        except Exception:  # nor is a fault of the search's own (tried again, it fails again)
            log_worker.exception("message %s: the article search failed on this question; "
                                 "answering without the articles (a fault in wxbot: please "
                                 "report this line and the question)", message.id)
            return []

    def _refuse(self, message: Message) -> int:
        """A question or drawing with a blocked word: the refusal, and no model call."""
        log_worker.warning("message %s from %s: question blocked (WXBOT_BLOCKED_WORDS)",
                           message.id, short_id(message.openid))
        self.store.bump("blocked", time.time())
        return self.store.save_answer(message, [self.settings.blocked_reply], time.time())

    def _closing(self, message: Message) -> Callable[[int], bool]:
        """Which segments of the answer about to be written close a batch, and so end with
        the 继续 line when more follows (next_send): the last the message's quota allows, and
        every 5th after it, each fetched by a 继续; in a passive reply, every one."""
        passive = not self.mode.sends(message.id)
        before, quota = len(self.store.segments(message.id)), self.store.quota(message)
        return lambda n: passive or (before + n >= quota - 1 and
                                     (before + n - quota + 1) % QUOTA == 0)

    def draw(self, message: Message, prompt: str) -> int | None:
        """Have the Images API draw the prompt and upload the picture, each step stored before
        the next; the answer is the picture (or the line that says why not).

        Typing shows meanwhile, as for any message (Acknowledger); a restart resumes at the
        first step not stored: it never pays for a second picture nor uploads it twice.
        """
        now = time.time()
        full = self.store.reserve_image(message, prompt, now, self.settings.image_daily, [
            (60, self.settings.user_rate), (86400, self.settings.user_daily)])
        if full and full[0] == "images":
            return self._over_limit(message, full[1], DRAW_DAILY_LINE.format(
                limit=self.settings.image_daily, hours=max(1, round(full[1] / 3600))))
        if full:
            return self._over_limit(message, full[1])
        image = self.store.image(message.id)
        if image["bytes"] is None and image["media_id"] is None:
            try:
                data = self.image_model.draw(prompt)
            except ModelError as error:
                if error.kind != "transient" or message.model_failures + 1 >= self.MODEL_TRIES:
                    self.store.unreserve_image(message)
                return self._model_failed(message, error, None, DRAW_REFUSED_LINE,
                                          chat_model=False)
            if image_type(data) is None or len(data) > IMAGE_BYTES:
                log_worker.error("message %s: the Images API returned %s; WeChat takes JPEG or "
                                 "PNG up to 10 MB: choose a WXBOT_IMAGE_MODEL (or provider) "
                                 "that returns one", message.id, f"{len(data)} bytes over "
                                 "10 MB" if len(data) > IMAGE_BYTES else
                                 f"another format (starting {data[:8]!r})")
                return self.store.complete_answer(message, time.time(), [IMAGE_UNUSABLE_LINE])
            self.store.keep_image(message, data)
        try:
            image_media_id(self.store, self.wechat, message.id)
        except WeChatError as error:
            if error.errcode != 48001:  # not sent yet: delivery retries the upload
                log_worker.warning("message %s: picture not uploaded yet (%s)", message.id,
                                   error.hint())
            else:
                return self.store.complete_answer(message, time.time(), [
                    self._no_media(message)])
        return self.store.add_image(message, time.time())

    def _no_media(self, message: Message) -> str:
        """WeChat refused the upload (48001): the line the user gets instead, logged once."""
        if self.wechat.first_time(48001):
            log_worker.error("message %s: WeChat refuses to take pictures (48001 from "
                             "media/upload: only verified accounts, or the 测试号, may upload "
                             "media): verify the account, or unset WXBOT_IMAGE_MODEL",
                             message.id)
        return IMAGE_NOT_ALLOWED_LINE

    def _ask(self, system_prompt: str, history: list[dict], ask: list[dict],
             deadline: Deadline) -> Iterator[str]:
        """The model's answer as it streams; a context-too-long error retries without history."""
        system = [{"role": "system", "content": system_prompt}]
        try:
            yield from self.model.stream(system + alternating(history + ask), deadline)
            return
        except ModelError as error:
            if error.kind != "context" or not history:
                raise
        log_worker.warning("context too long for the model; retrying without history")
        yield from self.model.stream(system + ask, deadline)

    def _watched(self, message: Message, answer: Iterator[str],
                 deadline: Deadline) -> Iterator[str]:
        """The answer within its deadline, the lease kept meanwhile.

        A model that writes slowly, or starts late, would outlive the lease, and another
        worker would ask it again. So the model is read in a thread of its own while this one
        renews the lease every third of it and, at the deadline (or when the answer is no
        longer wanted), hangs up: the model stops writing and billing, and what came in time
        is all the answer has.
        """
        pieces: queue.SimpleQueue = queue.SimpleQueue()

        def read() -> None:
            try:
                for text in answer:
                    if deadline.hung_up:
                        return
                    pieces.put(("text", text))
                pieces.put(("end", None))
            except Exception as error:  # ModelError or a bug: this thread's caller decides
                pieces.put(("error", error))
            finally:
                answer.close()

        threading.Thread(target=read, name=f"{self.name}-model", daemon=True).start()
        renew_every = self.lease_seconds / 3
        renew_at = time.monotonic() + renew_every
        held = None  # what came after the last piece: the end, or an error
        begun = False  # whether any text came: at the deadline, a stall, or no first byte
        try:
            while True:
                now = time.monotonic()
                if now >= renew_at:
                    self.store.renew_lease(message, time.time() + self.lease_seconds)
                    renew_at = now + renew_every
                try:
                    kind, value = held or pieces.get(
                        timeout=max(0.0, min(deadline.at, renew_at) - now))
                except queue.Empty:
                    kind, value = None, None
                held = None
                if kind == "text":
                    # The pieces of one network read go on as one: blocked words and the
                    # cutting of segments work once a read, not once a chunk.
                    texts = [value]
                    while held is None:
                        try:
                            kind, value = pieces.get_nowait()
                        except queue.Empty:
                            break
                        if kind == "text":
                            texts.append(value)
                        else:
                            held = kind, value
                    begun = True
                    yield "".join(texts)
                elif kind == "end":
                    return
                elif time.monotonic() >= deadline.at:  # a read timeout is past it too
                    raise deadline.error(begun or deadline.responded)
                elif kind == "error":
                    raise value
        finally:
            deadline.hang_up()

    def _over_limit(self, message: Message, wait: float, line: str = "") -> int:
        """One short notice per user and window; further messages in it get nothing."""
        now = time.time()
        notice_key = LIMIT_NOTICE_KEY.format(openid=message.openid,
                                             kind="own" if line else "calls")
        line = line or (RATE_LINE.format(wait=max(1, round(wait))) if wait <= 60
                        else DAILY_LINE.format(hours=max(1, round(wait / 3600))))
        segments = [] if self.store.get_kv(notice_key, now) else [line]
        if segments:
            self.store.set_kv(notice_key, "1", now + wait)
        elif self.acknowledger:
            self.acknowledger.nothing_comes(message.openid, message.received_at)
        log_worker.warning("message %s from %s: over the per-user limit (WXBOT_USER_RATE/"
                           "WXBOT_USER_DAILY); no model call, %s", message.id,
                           short_id(message.openid), "notice sent" if segments else "silent")
        return self.store.save_answer(message, segments, now)

    def _model_failed(self, message: Message, error: ModelError, question: str | None,
                      refused_line: str = REFUSED_LINE, cited: str = "",
                      chat_model: bool = True) -> int | None:
        """Retry later, hold the question through an outage of the chat model, or end the
        answer with a polite line; what was sent stays sent (and `cited`, the 来源 line of
        what it cited, ends it before the cut-off note)."""
        if self.metrics:
            self.metrics.count("wxbot_model_errors_total", error.failed.replace(" ", "_"))
        partial = self.store.partial_answer(message.id)
        if chat_model and self.outage and not partial and \
                self.outage.failed(message, error, time.time()):
            return self._held(message)
        failures = message.model_failures + 1
        if error.kind == "transient" and failures < self.MODEL_TRIES:
            delay = max(error.retry_after or 0, self._backoff(failures))
            log_worker.warning("message %s: model failed (%s); retry %d/%d in %.1f s",
                               message.id, error, failures, self.MODEL_TRIES - 1, delay)
            self.store.release(message, time.time() + delay, str(error), "model_failures")
            self.wakeup.notify()
            return None
        if error.kind == "refused":
            log_worker.warning("message %s: the model refused (content filter)", message.id)
            line = refused_line
        else:
            log_worker.error("message %s from %s: model failed (%s); %s", message.id,
                             short_id(message.openid), error, "the part already written is "
                             "kept and ends with the cut-off line" if partial else
                             "sending the apology")
            if partial:  # the note ends the last segment where it fits: no message of its own
                note = "\n\n".join(line for line in (cited, CUT_OFF_LINE) if line)
                return self.store.complete_answer(message, time.time(), [], question, partial,
                                                  note=note)
            line = APOLOGY_LINE
        return self.store.complete_answer(message, time.time(), [line], question,
                                          partial or None)

    def _held(self, message: Message) -> int | None:
        """The model is down for everyone: the message waits for it (Outage), its reader
        told once; past WXBOT_HOLD, the apology."""
        now = time.time()
        if now >= message.received_at + self.settings.hold:
            self.outage.gave_up(message)
            return self.store.complete_answer(message, now, [APOLOGY_LINE])
        tell = self.outage.hold(message, now)
        if tell is None:  # the model answered meanwhile: asked again now
            self.store.release(message, now, "", None)
            self.wakeup.notify()
        elif tell and self.mode.sends(message.id):
            try:
                self.wechat.customer_service_send(message.openid, HOLD_LINE)
            except WeChatError as error:  # the answer comes all the same
                log_worker.info("message %s: the line that it is held was not sent (%s)",
                                message.id, error.hint())
        return None

    def deliver(self, message: Message, model_seconds: float | None = None,
                streaming: bool = False, add: list[str] = ()) -> bool:
        """Send the unsent segments in order, each marked sent as WeChat confirms it.

        One commit a segment: the mark that WeChat took the last one and the note that the
        next is about to go (after `add`, new segments of an answer still streaming, stored
        first); the last also ends the message. False when a send failed.
        """
        sent_seq = None
        while True:
            now = time.time()
            with self.store.transaction():
                if add:
                    self.store.add_segments(message, add)
                if sent_seq is not None:
                    self.store.mark_sent(message, sent_seq, now)
                rows = self.store.segments(message.id)
                pick = None if not self.mode.sends(message.id) else next_send(  # passive:
                    rows, self.store.quota(message), streaming,  # the webhook's
                    self.store.continue_id(message.id))
                if pick:
                    self.store.mark_trying(message, pick[0]["seq"], now, now + self.lease_seconds)
                elif not streaming:
                    texts = [row["content"] for row in rows]
                    apology = texts == [APOLOGY_LINE]
                    outcome = "apology" if apology else "refused" if texts in (
                        [self.settings.blocked_reply], [REFUSED_LINE], [DRAW_REFUSED_LINE]) \
                        else "answered"
                    self.store.finish(message, State.FAILED if apology else State.DONE)
            add = ()
            if not pick:
                break
            row, text = pick
            if row["tried_at"] is not None:
                # WeChat has no idempotency key: a send cut off by a crash or a timeout may
                # have arrived. Sending again risks a repeat; not sending risks a loss.
                log_worker.warning("message %s: segment %d was in flight when its last try "
                                   "ended; sending it again (the user may see it twice)",
                                   message.id, row["seq"])
            try:
                if row["image"]:
                    self._send_image(message, row)
                elif row["card"]:
                    self._send_card(message, row)
                else:
                    self.wechat.customer_service_send(message.openid, text)
            except WeChatError as error:
                # It never arrived: its next try is no repeat, unless a try before this one
                # may have arrived (the mark of that one stays).
                if error.declined and row["tried_at"] is None:
                    self.store.declined(message)
                if not streaming:  # while streaming, the final delivery deals with it
                    self._send_failed(message, error)
                return False
            self.mode.service_works(message.id)
            sent_seq = row["seq"]
        if not streaming:
            # What the user felt: from the push to the first message they saw.
            first = min((row["sent_at"] for row in rows if row["sent_at"] is not None),
                        default=None)
            if self.metrics:
                self.metrics.count("wxbot_answers_total", outcome)
                if first:
                    self.metrics.observe("wxbot_first_message_seconds",
                                         first - message.received_at)
                if model_seconds is not None:
                    self.metrics.observe("wxbot_model_seconds", model_seconds)
            log_worker.info("message %s from %s (%s): first message %s after the push, model "
                            "%s, segments sent %d/%d", message.id, short_id(message.openid),
                            message.msg_id or message.event,
                            f"{first - message.received_at:.2f}s" if first else "-",
                            f"{model_seconds:.2f}s" if model_seconds is not None else "-",
                            sum(row["sent_at"] is not None for row in rows), len(rows))
        return True

    def _send_image(self, message: Message, row: sqlite3.Row) -> None:
        """Send a picture, uploaded again if its media_id expired; a line in its place when
        WeChat refuses the upload (48001) or the picture is gone."""
        try:
            media_id = image_media_id(self.store, self.wechat, row["image"])
        except WeChatError as error:
            if error.errcode != 48001:
                raise
            media_id, line = None, self._no_media(message)
        else:
            line = IMAGE_GONE_LINE
        if media_id is None:
            self.store.image_as_text(message.id, row["seq"], line)
            self.wechat.customer_service_send(message.openid, line)
            return
        self.wechat.send_image(message.openid, media_id)
        self.store.image_sent(row["image"])

    def _send_card(self, message: Message, row: sqlite3.Row) -> None:
        """Send an article's card; its 来源 line instead when WeChat refuses the card itself
        (an article since deleted, a card type the account may not send: 48001 too, which
        says nothing of texts, so it never makes the replies passive; the line, if refused
        as well, does). What fails any message (the quota, the window, the network) fails it
        as it would a text."""
        try:
            self.wechat.send_card(message.openid, json.loads(row["card"]))
        except WeChatError as error:
            if error.errcode in (None, -1, 45011, 40164) or \
                    error.errcode in GIVE_UP and error.errcode != 48001:
                raise
            log_worker.warning("message %s: WeChat refused the article's card (%s); its 来源 "
                               "line goes instead", message.id, error.hint())
            self.store.card_as_text(message.id, row["seq"])
            self.wechat.customer_service_send(message.openid, row["content"])

    def _send_failed(self, message: Message, error: WeChatError) -> None:
        if self.metrics:
            self.metrics.count("wxbot_wechat_errors_total", str(error.errcode or "unreachable"))
        if error.errcode == 48001 and self.mode.no_permission(message.id, time.time()):
            self.store.finish(message, State.DONE)  # what is unsent goes out passively
            return
        if error.errcode in GIVE_UP:
            if self.wechat.first_time(error.errcode):
                log_worker.error("message %s to %s not delivered: %s", message.id,
                                 short_id(message.openid), error.hint())
            self.store.finish(message, State.DONE, f"errcode {error.errcode}")
            if self.metrics:
                self.metrics.count("wxbot_answers_total", "undelivered")
            if self.notifier and error.errcode != 45047:  # 45047: the rest waits, kept
                self.notifier.tell("undelivered", f"给读者 {short_id(message.openid)} 的回答（消息 "
                                   f"#{message.id}）未送达：错误码 {error.errcode}")
            return
        failures = message.delivery_failures + 1
        if failures >= self.DELIVERY_TRIES:
            log_worker.error("message %s: giving up after %d failed deliveries (state dead, "
                             "kept: `python wxbot.py status`, `python wxbot.py retry %s`): %s",
                             message.id, failures, message.id, error.hint())
            self.store.finish(message, State.DEAD, str(error), "delivery_failures")
            if self.metrics:
                self.metrics.count("wxbot_answers_total", "dead")
            if self.notifier:
                self.notifier.tell("undelivered", f"给读者 {short_id(message.openid)} 的回答（消息 "
                                   f"#{message.id}）{failures} 次都没发出去，已放弃；可在控制台 "
                                   f"队列 里重试。")
            return
        delay = self._backoff(failures)
        if error.errcode in (40164, 45011):  # whitelist or per-minute limit: not a hot loop
            delay = max(delay, 30 * self.settings.retry_base)
        log_worker.warning("message %s: send failed (%s); retry in %.1f s", message.id,
                           error.hint(), delay)
        self.store.release(message, time.time() + delay, str(error), "delivery_failures")


class Sender(Worker):
    """Answers the messages that need no model: the owner's fixed replies, which the webhook
    stores as they arrive (Store.reply_at_once), answers whose delivery is tried again, and
    the replies made from what is stored (继续, /reset, /help, the welcome: needs_model()),
    each after its user's earlier messages. None waits for a worker: in a burst every worker
    may be busy with the model for minutes. Planning and delivery are the worker's own
    (Worker.plan, Worker.deliver): each segment marked sent as WeChat confirms it, within the
    message's quota, and a failure retried, logged or given up as for any answer."""

    #: Sender threads: a send takes some 50 ms, so a few keep up with a burst of menu taps.
    THREADS = 4
    READY_ONLY = True


###############################################################################
# Web app: the webhook ########################################################
###############################################################################

#: WeChat's pushes are a few KB; anything bigger is refused unread.
MAX_BODY = 1024 * 1024
#: What a refused request is answered; the log line (at most one a minute) says why.
REFUSALS = {400: "bad request", 403: "forbidden", 411: "length required", 413: "too large"}
#: With WXBOT_MAX_SKEW=0 no timestamp is too old; a used signed URL is remembered this long.
UNCHECKED_REPLAY_WINDOW = 300


class ReplayRecord:
    """The signatures of recent pushes, each with a digest of its message.

    WeChat's signature covers token, timestamp and nonce, not the body, so one captured query
    string (an access log, a proxy) would sign any body. The same signature with the same body
    is WeChat retrying; with another body it is a replay, refused. Kept by signature, not by
    (timestamp, nonce): the signature is of the three joined in sorted order, so the digits
    of a timestamp and a nonce can be split anew ("1714036504", "123" as "17140365",
    "04123" and the like) into another pair with the same signature. A signature is kept
    until its timestamp is older than WXBOT_MAX_SKEW, when the signature check refuses it
    anyway: memory holds one window of pushes. In memory only: a restart forgets it (see
    docs/security.md).
    """

    def __init__(self, max_skew: int, token: str):
        self.max_skew, self.token = max_skew, token
        self._digests: dict[str, bytes] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap, soonest first
        self._lock = threading.Lock()

    def check(self, timestamp: str, nonce: str, body: bytes, now: float) -> None:
        """Record this push's signature; raise Forbidden when it came with another body."""
        digest = hashlib.blake2b(body, digest_size=16).digest()
        pair = wechat_signature(self.token, timestamp, nonce)
        expires = (int(timestamp) + self.max_skew if self.max_skew
                   else now + UNCHECKED_REPLAY_WINDOW)
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                del self._digests[heapq.heappop(self._expiry)[1]]
            seen = self._digests.setdefault(pair, digest)
            if seen is digest:
                heapq.heappush(self._expiry, (expires, pair))
        if seen != digest:
            raise Forbidden("this signature (timestamp and nonce) already came with another "
                            "body: a replayed URL, refused")

    def __len__(self) -> int:
        """How many signatures are held: one window of pushes."""
        return len(self._digests)


def query_dict(environ: dict) -> dict[str, str]:
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    return {key: values[0] for key, values in query.items()}


#: Passive replies: WeChat waits 5 s for a reply, then pushes the same message again, three
#: times in all. A reply not ready in time lets the try lapse so that the next one comes;
#: the third try gets THINKING_LINE rather than nothing.
WECHAT_TIMEOUT = 5.0
#: A segment goes into a reply only while this much of WeChat's 5 s remains.
HAND_OUT_MARGIN = 0.5


#: Characters XML 1.0 does not allow anywhere, CDATA included: a model may write them (an
#: escape "\x1b[0m", a bell), and one of them makes the whole reply unreadable to WeChat.
NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def text_reply_xml(openid: str, account: str, content: str, now: float) -> bytes:
    """WeChat's passive text reply; Content is never empty."""
    content = NOT_XML.sub("", content or "") or APOLOGY_LINE
    content = content.replace("]]>", "]]]]><![CDATA[>")
    return (f"<xml><ToUserName><![CDATA[{openid}]]></ToUserName>"
            f"<FromUserName><![CDATA[{account}]]></FromUserName>"
            f"<CreateTime>{int(now)}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content></xml>").encode("utf-8")


def image_reply_xml(openid: str, account: str, media_id: str, now: float) -> bytes:
    """WeChat's passive image reply (WECHAT.md §8)."""
    return (f"<xml><ToUserName><![CDATA[{openid}]]></ToUserName>"
            f"<FromUserName><![CDATA[{account}]]></FromUserName>"
            f"<CreateTime>{int(now)}</CreateTime><MsgType><![CDATA[image]]></MsgType>"
            f"<Image><MediaId><![CDATA[{media_id}]]></MediaId></Image></xml>").encode("utf-8")


def transfer_reply_xml(openid: str, account: str, now: float) -> bytes:
    """The passive reply that hands a message to WeChat's own 客服 (WECHAT.md §9)."""
    return (f"<xml><ToUserName><![CDATA[{openid}]]></ToUserName>"
            f"<FromUserName><![CDATA[{account}]]></FromUserName>"
            f"<CreateTime>{int(now)}</CreateTime>"
            f"<MsgType><![CDATA[transfer_customer_service]]></MsgType></xml>").encode("utf-8")


class Webhook:
    """Turns WeChat's HTTP calls into stored pushes; pure of I/O apart from the store."""

    #: Where pushes are counted (Bot sets it).
    metrics: "Metrics | None" = None

    def __init__(self, settings: Settings, store: Store, wakeup: Wakeup,
                 mode: DeliveryMode | None = None, clock: Callable[[], float] = time.time,
                 acknowledger: Acknowledger | None = None, owner: OwnerFiles | None = None,
                 wechat: WeChatAPI | None = None, ready: Wakeup | None = None,
                 publishing: "ArticleSync | None" = None, handoff: Handoff | None = None):
        self.settings, self.store, self.wakeup, self.clock = settings, store, wakeup, clock
        self.handoff = handoff  # readers a person answers: no answer from the bot
        self.publishing = publishing  # learns a newly published article, off the ack's path
        self.ready = ready or wakeup  # wakes the senders: a fixed reply is stored, ready
        self.wechat = wechat  # uploads a drawn picture again when its media_id expired
        self.mode = mode or DeliveryMode("service", store)
        self.acknowledger = acknowledger
        self.owner = owner or OwnerFiles(settings)
        self.crypto = (WeChatCrypto(settings.aes_key, settings.appid)
                       if settings.aes_key else None)
        self.replays = ReplayRecord(settings.max_skew, settings.token)
        self.refusals = LogThrottle()
        self.accepting = True

    def verify(self, query: Mapping[str, str], client: str = "") -> tuple[int, str]:
        """GET: the server check WeChat makes when the URL is saved in 公众号后台."""
        try:
            check_signature(self.settings.token, query, self.clock(), self.settings.max_skew)
        except Forbidden as error:
            return self.refuse(client, "verification", 403, error)
        echostr = query.get("echostr", "")
        # WeChat's echostr is a number; anything else echoed would be a signed URL serving
        # whatever page its holder wrote into it.
        if not re.fullmatch("[0-9]{1,64}", echostr):
            return self.refuse(client, "verification", 400, BadPush("echostr is not a number"))
        if self.refusals.allow("verified:" + client, time.time()) is not None:
            log_web.info("URL verification from %s passed: WeChat may push messages here now",
                         client)
        return 200, echostr

    def before_body(self, query: Mapping[str, str], length: int,
                    client: str = "") -> tuple[int, str] | None:
        """POST, before its body is read: a refusal, or None to read the body and receive it.

        A request that is unsigned, stale or too big costs no read: a client cannot make
        wxbot wait for a body it will refuse anyway.
        """
        if not self.accepting:
            return 503, "stopping"
        try:
            self.check_query(query)
        except Forbidden as error:
            return self.refuse(client, "push", 403, error)
        except BadPush as error:
            return self.refuse(client, "push", 400, error)
        if length > MAX_BODY:
            return self.refuse(client, "push", 413, f"Content-Length {length} over {MAX_BODY}")
        if length < 0:
            return self.refuse(client, "push", 411, "no Content-Length")
        return None

    def refuse(self, client: str, what: str, status: int, reason) -> tuple[int, str]:
        """The answer to a refused request, and at most one log line a minute per client."""
        held = self.refusals.allow(client, self.clock())
        if held is not None:
            log_web.warning("%s refused (%d) from %s: %s%s", what, status, client or "?", reason,
                            f" ({held} more from this address since its last line)"
                            if held else "")
        return status, REFUSALS[status]

    def unstored(self, error: sqlite3.Error) -> tuple[int, str]:
        """The answer to a push that could not be stored: 503, so that WeChat tries it again.
        While the disk is full every push is refused: one line a minute says how many."""
        if not disk_full(error):
            log_web.error("could not store a push: %s", error)
        else:
            self.store.refused_push()
            if self.metrics:
                self.metrics.count("wxbot_pushes_refused_total", "disk_full")
            held = self.refusals.allow("the disk is full", self.clock())
            if held is not None:
                log_web.error("push refused (503): the disk is full%s", f" ({held} more "
                              f"refused since the last line)" if held else "")
        return 503, "busy"

    def receive(self, query: Mapping[str, str], body: bytes, client: str = "",
                arrived: float | None = None) -> tuple[int, str]:
        """POST: check, decrypt, parse, store; (status, body) for WeChat. `arrived`: when the
        request came (time.monotonic()), from which WeChat's 5 s run."""
        arrived = time.monotonic() if arrived is None else arrived
        if not self.accepting:
            return 503, "stopping"
        try:
            push = self.parse(query, body)
        except Forbidden as error:
            return self.refuse(client, "push", 403, error)
        except BadPush as error:
            return self.refuse(client, "push", 400, error)
        now = self.clock()
        how = route(self.settings, self.owner.replies, push, self.owner.blocked, self.handoff)
        model = how.route in MODEL_ROUTES
        message_id, pushes = self.store.store_push(push, now, model)
        if pushes == 1 and self.metrics:
            self.metrics.count("wxbot_pushes_total")
        person = how.route in (Route.HELD, Route.PERSON)
        if pushes == 1 and how.route is Route.PERSON and self.handoff:
            # From here, not when a worker takes the message: with WXBOT_HANDOFF=wechat the
            # reader's next message, sent before that, goes to WeChat's 客服 too.
            self.handoff.asking(push.openid, now)
        if pushes == 1 and push.event == "PUBLISHJOBFINISH" and self.publishing:
            self.publishing.pushed(push.fields)  # an event like any other to the rest: no answer
        if pushes > 1:
            log_web.debug("retried push %s from %s already stored", push.dedup_key,
                          short_id(push.openid))
        elif not person and self.fixed_reply(push, message_id):
            if not self.mode.passive:
                self.ready.notify()  # a sender sends it, however busy the workers are
        else:
            self.mode.try_service(message_id, time.time())  # before a worker can take it
            if model:
                self.wakeup.notify()
                if self.acknowledger and not self.mode.passive:
                    self.acknowledger.pushed(message_id, push.openid, now)
            else:  # 继续, /help, the welcome...: a sender, however busy the workers are
                self.ready.notify()
        if person and self.settings.handoff == "wechat":  # WeChat's own 客服 takes it
            return 200, self.reply_body(push, "", query, transfer_reply_xml(
                push.openid, push.account, self.clock()))
        if self.mode.passive:
            return 200, self.passive_reply(push, message_id, pushes, query, arrived)
        return 200, "success"

    def fixed_reply(self, push: Push, message_id: int) -> bool:
        """Store a keyword's or a click's fixed reply as this push's answer, so that it goes
        out at once (as the passive reply, or by a Sender), even while the user's question
        before it is being answered; False when there is none, or a worker took the message
        first (its answer comes as any other)."""
        fixed = self.owner.replies.fixed_reply(push.msg_type, push.content, push.event,
                                               push.fields.get("EventKey", ""))
        if not fixed or not self.store.reply_at_once(message_id, fixed[1], self.clock(),
                                                     self.mode.passive):
            return False
        self.store.bump(fixed[0], self.clock())
        return True

    def passive_reply(self, push: Push, message_id: int, pushes: int,
                      query: Mapping[str, str], arrived: float) -> str:
        """The reply to this push: its answer's next segment, once it is ready.

        WeChat's 5 s run from the request's arrival (`arrived`, time.monotonic()). A segment
        goes out only while HAND_OUT_MARGIN of them remain, so that a reply WeChat gives up
        on never takes one with it; later, this try lapses (WeChat pushes again) or, on the
        third, gets THINKING_LINE, and the segment waits for the user's next message. The
        thread sleeps until something is written for this user: waiting costs nothing.
        """
        hand_out_by = arrived + WECHAT_TIMEOUT - HAND_OUT_MARGIN
        fetch = route(self.settings, self.owner.replies, push).route is Route.CONTINUE
        with self.store.wakeups.listen(push.openid) as bell:
            while True:
                bell.clear()  # before the look, so that a write after it is not missed
                settled = self.store.settled(message_id)
                # A message trying the customer-service API: its reply waits for the outcome.
                reply = None if message_id == self.mode.trial and not settled else \
                    self.store.passive_reply(push.openid, message_id, time.time(), hand_out_by,
                                             fetch)
                if reply:
                    text, more, image = reply
                    if image:
                        return self.image_reply(push, image, query)
                    return self.reply_body(push, text + continue_tail(
                        more[0], self.store.continue_id(more[1]), text) if more else text, query)
                remaining = hand_out_by - time.monotonic()
                if remaining <= 0:
                    break
                if settled:  # nothing to say (an event, a merged message)
                    return "success"
                bell.wait(remaining)
        if pushes >= 3:
            return self.reply_body(push, THINKING_LINE.format(
                link=CONTINUE_LINK.format(answer=self.store.continue_id(message_id))),
                query)
        # Let this try lapse unanswered: WeChat then pushes the message again.
        time.sleep(max(0.0, arrived + WECHAT_TIMEOUT + 0.5 - time.monotonic()))
        return "success"

    def image_reply(self, push: Push, image_id: int, query: Mapping[str, str]) -> str:
        """A drawn picture as the reply; a line instead when it cannot be sent."""
        try:
            media_id = image_media_id(self.store, self.wechat, image_id) if self.wechat \
                else None
        except WeChatError as error:
            log_web.error("a drawn picture was not uploaded: %s", error.hint())
            return self.reply_body(push, IMAGE_NOT_ALLOWED_LINE if error.errcode == 48001
                                   else APOLOGY_LINE, query)
        if media_id is None:
            return self.reply_body(push, IMAGE_GONE_LINE, query)
        self.store.image_sent(image_id)
        return self.reply_body(push, "", query, image_reply_xml(
            push.openid, push.account, media_id, self.clock()))

    def reply_body(self, push: Push, text: str, query: Mapping[str, str],
                   xml: bytes = b"") -> str:
        """The reply as WeChat takes it: `text` (or a ready `xml`), encrypted in 安全模式."""
        xml = xml or text_reply_xml(push.openid, push.account, text, self.clock())
        if query.get("encrypt_type") == "aes" and self.crypto:
            xml = self.crypto.reply(self.settings.token, xml, query.get("timestamp", ""),
                                    query.get("nonce", ""))
        return xml.decode("utf-8")

    def check_query(self, query: Mapping[str, str]) -> None:
        """What the query string alone shows: signature, age, and the mode set in 公众号后台."""
        check_signature(self.settings.token, query, self.clock(), self.settings.max_skew)
        encrypt_type = query.get("encrypt_type", "raw")
        if encrypt_type not in ("raw", "aes"):
            raise BadPush(f"unknown encrypt_type {encrypt_type[:10]!r}")
        if encrypt_type == "aes" and self.crypto is None:
            raise Forbidden("an encrypted push arrived but WXBOT_AES_KEY is not set: set it to "
                            "the EncodingAESKey from 公众号后台 → 设置与开发 → 基本配置")
        # With the key set, a plaintext push is no proof of anything but one signed URL.
        if encrypt_type == "raw" and self.crypto is not None:
            raise Forbidden("明文模式的推送被拒绝：已设置 WXBOT_AES_KEY。在公众号后台 → 设置与开发 → "
                            "基本配置 → 服务器配置 把消息加解密方式改为安全模式或兼容模式；"
                            "或者删除 WXBOT_AES_KEY 后重启 (plaintext push refused because "
                            "WXBOT_AES_KEY is set)")

    def parse(self, query: Mapping[str, str], body: bytes) -> Push:
        self.check_query(query)
        message = body
        if query.get("encrypt_type") == "aes":
            message = self.decrypt(query, parse_xml(body))
        # The message as the signature vouches for it: in 安全模式 the decrypted XML, so a
        # retry that WeChat encrypted afresh is still the same message.
        self.replays.check(query["timestamp"], query["nonce"], message, self.clock())
        return Push.from_fields(parse_xml(message))

    def decrypt(self, query: Mapping[str, str], fields: dict[str, str]) -> bytes:
        """The XML inside <Encrypt>, once msg_signature shows WeChat wrote it."""
        encrypted = fields.get("Encrypt", "")
        if not encrypted:
            raise BadPush("encrypt_type=aes but no <Encrypt>")
        expected = wechat_signature(self.settings.token, query.get("timestamp", ""),
                                    query.get("nonce", ""), encrypted)
        if not hmac.compare_digest(expected.encode(),
                                   query.get("msg_signature", "").encode("utf-8", "replace")):
            raise Forbidden("msg_signature does not match")
        return self.crypto.decrypt(encrypted)


def logged_not_printed(callback):
    """A bottle plugin: an unexpected error goes to the log, where secrets are masked, and the
    client gets a bare 500: bottle's catchall would print the traceback to stderr, past the
    filter."""
    def guarded(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:  # an answer, not an error
            raise
        except Exception:
            log_web.exception("internal error answering %s %s", bottle.request.method,
                              bottle.request.path)
            return bottle.HTTPResponse("error", 500, {"Content-Type": "text/plain; charset=utf-8"})
    return guarded


def make_app(settings: Settings, store: Store, webhook: Webhook) -> bottle.Bottle:
    """The WSGI app: the webhook at WXBOT_PATH and /healthz."""
    app = bottle.Bottle(catchall=True)

    def text(status: int, body: str) -> bottle.HTTPResponse:
        kind = "application/xml" if body.startswith("<xml>") else "text/plain"
        return bottle.HTTPResponse(body, status, {"Content-Type": f"{kind}; charset=utf-8"})

    app.install(logged_not_printed)

    @app.get(settings.path)
    def verify():
        """WeChat's server check: the echostr back when the signature is valid."""
        environ = bottle.request.environ
        return text(*webhook.verify(query_dict(environ), environ.get("REMOTE_ADDR", "")))

    @app.post(settings.path)
    def receive():
        """A push: stored and answered "success" at once."""
        arrived = time.monotonic()
        environ = bottle.request.environ
        query, client = query_dict(environ), environ.get("REMOTE_ADDR", "")
        # ASCII digits only: "²".isdigit() is true and int() refuses it, as it refuses a number
        # of over 4,300 digits; either would be an error, logged at an unsigned client's pace.
        digits = environ.get("CONTENT_LENGTH", "")
        length = int(digits) if re.fullmatch("[0-9]{1,18}", digits) else \
            MAX_BODY + 1 if re.fullmatch("[0-9]+", digits) else -1
        refusal = webhook.before_body(query, length, client)
        if refusal:
            return text(*refusal)
        try:
            body = environ["wsgi.input"].read(length)
        except OSError:  # the request's deadline passed mid-body (HTTP server)
            return text(408, "request timeout")
        try:
            return text(*webhook.receive(query, body, client, arrived))
        except sqlite3.Error as error:  # not answered: WeChat retries the push
            return text(*webhook.unstored(error))

    @app.get("/healthz")
    def healthz():
        """Queue depth and the age of the oldest waiting message; 503 while the disk is full."""
        health = {"status": "ok", **store.health(time.time()), "mode": webhook.mode.in_force}
        if store.disk_full:  # cleared by the first write that finds room (workers try)
            health.update(status="disk full", reason="the disk holding the database is "
                          "full: pushes are answered 503 (WeChat retries them) and answers "
                          "wait; free some space")
        return bottle.HTTPResponse(json.dumps(health), 503 if store.disk_full else 200,
                                   {"Content-Type": "application/json"})

    @app.error(404)
    @app.error(405)
    def not_here(error):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return "not found" if error.status_code == 404 else "method not allowed"

    return app


###############################################################################
# HTTP server #################################################################
###############################################################################

class RequestReader(io.RawIOBase):
    """The client's socket, read under deadlines rather than a timeout per read.

    The first byte must come within `idle` seconds of the connection, and the whole request
    (headers and body) within `whole` seconds of that byte: a timeout per read alone lets a
    client that sends a byte every few seconds hold its thread for ever (slow loris).
    """

    def __init__(self, sock: socket.socket, idle: float, whole: float, write_timeout: float):
        self.sock, self.whole, self.write_timeout = sock, whole, write_timeout
        self.deadline = time.monotonic() + idle
        self.started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the request did not arrive in time")
        self.sock.settimeout(remaining)
        try:
            count = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.write_timeout)  # for the answer, written after
        if count and not self.started:
            self.started = True
            self.deadline = time.monotonic() + self.whole
        return count


class BadRequest(Exception):
    """A request head that is not HTTP/1.x as a client writes it: answered 400, closed."""


class QuietHandler:
    """One request per connection, read under deadlines, handed to the WSGI app.

    A connection is closed once its answer is written (HTTP/1.0 style: no idle keep-alive),
    when no byte came within `idle_timeout`, or when the request was not complete within
    `request_timeout` of its first byte. The head is read here and the body by the app, so a
    push refused on its query string costs no read (Webhook.before_body). Only what WeChat,
    a reverse proxy and /healthz need: no chunked bodies, no keep-alive, no Date or Server
    header. wsgiref's handler did the same in three times the CPU, a third of a push's cost.
    """

    idle_timeout = 5.0
    request_timeout = 10.0
    timeout = 10  # each write of the answer
    #: The request line and headers together: WeChat's are a few hundred bytes.
    MAX_HEAD = 16 * 1024

    def __init__(self, request: socket.socket, client_address, server: "ThreadingServer"):
        self.connection, self.client_address, self.server = request, client_address, server
        with contextlib.suppress(OSError):  # the client hung up, or a deadline passed
            self.handle()

    def handle(self) -> None:
        rfile = io.BufferedReader(RequestReader(self.connection, self.idle_timeout,
                                                self.request_timeout, self.timeout))
        try:
            environ = self.read_head(rfile)
        except BadRequest as error:
            log_web.debug("%s bad request: %s", self.client_address[0], error)
            self.answer("400 Bad Request", [("Content-Type", "text/plain")], b"bad request")
            return
        if environ is None:  # closed without a request
            return
        self.server.heard(self.connection, self.client_address[0])
        status, headers, body = self.run_app(environ)
        if log_web.isEnabledFor(logging.DEBUG):
            log_web.debug("%s %s %s %s", self.client_address[0], environ["REQUEST_METHOD"],
                          environ["PATH_INFO"], status.split(" ", 1)[0])
        self.answer(status, headers, body)

    def read_head(self, rfile: io.BufferedReader) -> dict | None:
        """The WSGI environ of the request whose head comes next; None when the client
        closed before a byte."""
        line = rfile.readline(self.MAX_HEAD + 1)
        if not line:
            return None
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or len(line) > self.MAX_HEAD:
            raise BadRequest("not an HTTP/1.x request line")
        method, target, version = (part.decode("latin-1") for part in parts)
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "", "QUERY_STRING": query,
            "PATH_INFO": urllib.parse.unquote(path, "iso-8859-1"), "SERVER_PROTOCOL": version,
            "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]),
            "REMOTE_ADDR": self.client_address[0], "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.input": rfile, "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
        size = len(line)
        while True:
            line = rfile.readline(self.MAX_HEAD + 1)
            size += len(line)
            if size > self.MAX_HEAD:
                raise BadRequest(f"a head over {self.MAX_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                return environ
            if not line:
                return None  # closed mid-head
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise BadRequest("a header line without a name")
            if "_" in name:  # as wsgiref: X_Forwarded would pass for X-Forwarded
                continue
            key = name.upper().replace("-", "_")
            key = key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else "HTTP_" + key
            value = value.strip()
            environ[key] = f"{environ[key]},{value}" if key in environ else value

    def run_app(self, environ: dict) -> tuple[str, list, bytes]:
        started: list = []

        def start_response(status, headers, exc_info=None):
            if exc_info and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return chunks.append

        chunks: list[bytes] = []
        try:
            result = self.server.app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        except OSError:
            raise
        except Exception:  # the app's own guard (make_app) answers what it can
            log_web.exception("internal error answering %s %s", environ["REQUEST_METHOD"],
                              environ["PATH_INFO"])
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"error"
        return started[0], started[1], b"".join(chunks)

    def answer(self, status: str, headers: list, body: bytes) -> None:
        """The whole answer in one write: status line, headers, body."""
        head = "".join(f"{name}: {value}\r\n" for name, value in headers
                       if name.lower() not in ("content-length", "connection"))
        self.connection.sendall(f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\n"
                                f"Connection: close\r\n\r\n".encode("latin-1") + body)


def address_group(address: str) -> str:
    """Whose an address is, for a limit per client: an IPv6 address counts as its /64, since
    one subscriber holds all of its 2^64 addresses."""
    try:
        found = ipaddress.ip_address(address)
    except ValueError:
        return address
    if found.version == 4:
        return str(found)
    if found.ipv4_mapped:
        return str(found.ipv4_mapped)
    return str(ipaddress.ip_network(f"{found}/64", strict=False))


class ThreadingServer(socketserver.TCPServer):
    """A thread for each open connection, so a slow client never holds up WeChat's next
    push; threads are kept and reused, not started per connection.

    At most `max_connections` at once: each holds a thread (and its stack) for up to the
    request's deadline, so idle connections by the thousand would exhaust the process's
    threads. When all are taken, a new connection from a client (an address, an IPv6 /64)
    that holds fewer than another takes the place of one of that other's that has not sent
    its request yet (idle, or a byte at a time): however many addresses an attacker fills
    the slots from, each push of WeChat's (from addresses holding one or two) gets one. A
    connection of a client that holds the most is closed at once, and the log says so once a
    minute at most. A proxy the owner named (WXBOT_TRUSTED_PROXIES: nginx in front) speaks
    for many clients over its many connections: none of its connections makes room.
    """

    allow_reuse_address = True
    # Python's default backlog is 5: under a burst the kernel drops connection attempts and
    # clients retry a second later, past WeChat's 5 s budget (BENCHMARKS.md).
    request_queue_size = 1024
    max_connections = 512

    def __init__(self, address: tuple[str, int], app, handler=QuietHandler,
                 proxies: Sequence[str] = ()):
        self.app, self.proxies = app, proxies
        # Before the bind: a bind that fails calls server_close(), which reads it.
        self.threads: list[threading.Thread] = []
        super().__init__(address, handler)

    def server_activate(self):
        super().server_activate()
        self.open = 0
        self.refusals = LogThrottle()
        self.held: collections.Counter[str] = collections.Counter()  # connections per client
        # Each client's connections that have not sent their request yet, oldest first.
        self.waiting: dict[str, dict[socket.socket, None]] = collections.defaultdict(dict)
        self.spare = 0  # threads waiting for a connection
        self.handed: queue.SimpleQueue = queue.SimpleQueue()  # connections for them
        self.lock = threading.Lock()

    def process_request(self, request, client_address):
        group = address_group(client_address[0])
        proxy = trusted_proxy(client_address[0], self.proxies)
        with self.lock:
            full = self.open >= self.max_connections and not self._make_room(group)
            if not full:
                self.open += 1
                self.held[group] += 1
                if not proxy:
                    self.waiting[group][request] = None
                spare = self.spare > 0
                self.spare -= spare
        if full:
            self.refuse(request, f"{self.max_connections} connections are open already, "
                                 f"{self.held[group]} of them from {group}")
            return
        if spare:
            self.handed.put((request, client_address))
            return
        try:
            thread = threading.Thread(target=self.serve_connections, name="http-connection",
                                      args=(request, client_address), daemon=True)
            thread.start()
        except RuntimeError as error:  # can't start new thread: the system's task limit
            self.release(request, client_address[0])
            self.refuse(request, str(error))
            return
        self.threads.append(thread)

    def _make_room(self, group: str) -> bool:
        """Close the oldest connection still waiting for its request of the client that
        holds the most, if it holds more than `group` would with one more."""
        most = max((other for other, waiting in self.waiting.items() if waiting),
                   key=self.held.__getitem__, default=None)
        if most is None or self.held[most] <= self.held[group] + 1:
            return False
        victim = next(iter(self.waiting[most]))
        del self.waiting[most][victim]
        with contextlib.suppress(OSError):  # its thread wakes, ends it and releases its slot
            victim.shutdown(socket.SHUT_RDWR)
        return True

    def heard(self, request: socket.socket, address: str) -> None:
        """The connection's request has arrived: it is no longer one that may make room."""
        with self.lock:
            self.waiting.get(address_group(address), {}).pop(request, None)

    def serve_connections(self, request, client_address) -> None:
        """One connection after another, until server_close() hands this thread None."""
        while request is not None:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.release(request, client_address[0])
                self.shutdown_request(request)
            with self.lock:
                self.spare += 1
            request, client_address = self.handed.get() or (None, None)

    def release(self, request: socket.socket, address: str) -> None:
        """Give back the slot a connection from `address` held."""
        group = address_group(address)
        with self.lock:
            self.open -= 1
            self.held[group] -= 1
            if not self.held[group]:
                del self.held[group]
            waiting = self.waiting.get(group)
            if waiting is not None:
                waiting.pop(request, None)
                if not waiting:
                    del self.waiting[group]

    def handle_error(self, request, client_address):
        log_web.exception("internal error serving %s", client_address[0])

    def server_close(self):
        super().server_close()
        for _ in self.threads:  # each thread takes one, once its connection is answered
            self.handed.put(None)

    def refuse(self, request, why: str) -> None:
        self.shutdown_request(request)
        held_back = self.refusals.allow("connections", time.monotonic())
        if held_back is not None:
            log_web.warning("closed a new connection at once: %s (%d more since the last "
                            "such line); if these are not an attack, look at what holds them "
                            "open", why, held_back)


class CannotListen(OSError):
    """A listener's address cannot be had; the message is the sentence for the owner."""


class HttpServer:
    """The server and serve_forever in a thread, with a clean stop (bottle.run has none)."""

    def __init__(self, app, host: str, port: int, proxies: Sequence[str] = (),
                 setting: str = "WXBOT_PORT"):
        try:
            self.server = ThreadingServer((host, port), app, proxies=proxies)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CannotListen(
                    f"cannot listen on {host}:{port}: in use; another program holds it (a "
                    f"second wxbot? `ss -ltnp | grep :{port}` names it): stop it, or set "
                    f"{setting} to a free port") from None
            raise CannotListen(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                               f"check {setting} and the host it goes with") from None
        self.port = self.server.server_address[1]
        # How soon serve_forever sees stop(): twenty idle looks a second cost nothing
        # measurable, and stop() (each restart, each test) takes 50 ms rather than 500.
        self.thread = threading.Thread(target=self.server.serve_forever, name="http",
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


###############################################################################
# Metrics: what an operator can watch #########################################
###############################################################################

class Metrics:
    """Counts and timings since the start, and the queue and the disk as they are, in
    Prometheus' text exposition format (version 0.0.4) at /metrics on the admin listener.

    Written here rather than with prometheus_client: the format is a few line shapes, fixed
    since 2014, and wxbot needs three kinds (counter, gauge, histogram) of one process, no
    registry, push gateway or multiprocess mode; one file and four dependencies stay so.
    Counts live in memory (Prometheus reads a restart as a counter reset); what the
    database holds (the queue) is read at each scrape from the kept state counts.
    """

    #: Seconds: from WeChat's 5 s and a typing reader's patience to a slow model's minutes.
    BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0, 300.0)
    #: name -> (type, help, the label and its values shown from the start (at 0)).
    FAMILIES = {
        "wxbot_pushes_total": ("counter", "pushes from WeChat stored (retries of one not "
                               "counted)", None),
        "wxbot_pushes_refused_total": ("counter", "pushes answered 503 so that WeChat tries "
                                       "them again, by reason", ("reason", ("disk_full",))),
        "wxbot_answers_total": ("counter", "messages settled, by outcome",
                                ("outcome", ("answered", "apology", "refused", "undelivered",
                                             "dead"))),
        "wxbot_model_errors_total": ("counter", "failed model calls, by what failed",
                                     ("kind", tuple(sign.replace(" ", "_") for sign in
                                                    OUTAGE_SIGNS) + ("answer",))),
        "wxbot_wechat_errors_total": ("counter", "failed sends to WeChat, by errcode "
                                      "(unreachable: no answer)", ("kind", ())),
        "wxbot_model_tokens_total": ("counter", "tokens the provider reported using, by "
                                     "type", ("type", ("prompt", "completion"))),
        "wxbot_article_searches_total": ("counter", "questions searched in the articles",
                                         None),
        "wxbot_article_search_hits_total": ("counter", "searches that found passages", None),
        "wxbot_first_message_seconds": ("histogram", "from the push to the first message "
                                        "of its answer the reader saw", None),
        "wxbot_model_seconds": ("histogram", "from taking a message to its answer written",
                                None),
    }

    def __init__(self, store: Store, outage: Outage | None = None):
        self.store, self.outage = store, outage
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()  # (name, label) -> n
        self._histograms: dict[str, list] = {}  # name -> [count per bucket..., sum, count]
        for name, (kind, _, label) in self.FAMILIES.items():
            if kind == "histogram":
                self._histograms[name] = [0] * len(self.BUCKETS) + [0.0, 0]
            for value in label[1] if label else ("",):
                self._counts[name, value] += 0

    def count(self, name: str, label: str = "", amount: int = 1) -> None:
        with self._lock:
            self._counts[name, label] += amount

    def observe(self, name: str, seconds: float) -> None:
        """One timing into its histogram: the first bucket it fits (made cumulative when read)."""
        with self._lock:
            buckets = self._histograms[name]
            for n, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    buckets[n] += 1
                    break
            buckets[-2] += seconds
            buckets[-1] += 1

    def exposition(self, now: float) -> str:
        """The page Prometheus reads."""
        lines = []
        with self._lock:
            counts, histograms = dict(self._counts), {name: list(values) for name, values
                                                      in self._histograms.items()}
        for name, (kind, text, label) in self.FAMILIES.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                buckets, running = histograms[name], 0
                for bound, inside in zip(self.BUCKETS, buckets):
                    running += inside
                    lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
                lines += [f'{name}_bucket{{le="+Inf"}} {buckets[-1]}',
                          f"{name}_sum {buckets[-2]:.3f}", f"{name}_count {buckets[-1]}"]
                continue
            for (family, value), number in sorted(counts.items()):
                if family == name:
                    where = f'{{{label[0]}="{value}"}}' if label else ""
                    lines.append(f"{name}{where} {number}")
        health = self.store.health(now)
        main, wal = database_bytes(self.store.path)
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.store.path))).free
        except OSError:
            free = float("nan")
        gauges = [
            ("wxbot_queue_messages", "messages waiting or in progress", health["queued"]),
            ("wxbot_queue_oldest_age_seconds", "age of the oldest message waiting or in "
             "progress", health["oldest_queued_age_s"]),
            ("wxbot_dead_messages", "messages given up on, kept for `retry`", health["dead"]),
            ("wxbot_model_down", "1 while the model fails for everyone (questions held)",
             int(bool(self.outage and self.outage.down))),
            ("wxbot_held_questions", "questions held until the model is back",
             self.outage.held() if self.outage else 0),
            ("wxbot_disk_full", "1 while pushes cannot be stored for want of space",
             int(self.store.disk_full)),
            ("wxbot_disk_free_bytes", "free space where the database is", free),
            ("wxbot_database_bytes", "the database on disk, its WAL included", main + wal),
        ]
        for name, text, value in gauges:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"

    def wsgi(self, console: Callable | None = None, proxies: Sequence[str] = ()) -> Callable:
        """The admin listener's app: /metrics here, to its own host only (own_host), the rest
        the owner's console's (none without WXBOT_ADMIN_PASSWORD: 404)."""
        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/metrics":
                if not own_host(environ, proxies):
                    start_response("421 Misdirected Request",
                                   [("Content-Type", "text/plain; charset=utf-8")])
                    return [NOT_OWN_HOST.encode()]
                if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                    start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
                    return [b"method not allowed"]
                body = self.exposition(time.time()).encode()
                start_response("200 OK", [
                    ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                    ("Content-Length", str(len(body)))])
                return [body]
            if console is not None:
                return console(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found"]
        return app


###############################################################################
# Owner's console #############################################################
###############################################################################

#: A console session ends this long after its login, however busy.
CONSOLE_SESSION_SECONDS = 12 * 3600
#: Wrong passwords from one address within a minute before its logins are answered 429,
#: and from all addresses together before every login is.
CONSOLE_WRONG_TRIES = 5
CONSOLE_WRONG_TOTAL = 20
#: The days before today that the Overview shows.
CONSOLE_DAYS = 14
#: Rows a console list shows; older ones are a link away.
CONSOLE_ROWS = 50
#: "Most asked" counts the latest this many questions: a count over every message ever
#: stored would read the whole table on each look.
CONSOLE_ASKED = 1000
#: Conversations: at most this many of the latest messages are read to find the people who
#: wrote last (a few people writing thousands of messages leave the list short, not slow).
CONSOLE_PEOPLE_READ = 20000
#: A message is added to its day's tally once it is this old: its answer is in by then. A day
#: whose messages are all this old has its figures kept in the database (kv, CONSOLE_DAY_KEY).
CONSOLE_DAY_SETTLED = 3600.0
CONSOLE_DAY_KEY = "console-day:{}"
#: The session cookie's name, with the console's port: cookies know no port, and two consoles
#: on one host would overwrite each other's. Over HTTPS it is a __Host- cookie, which no other
#: site (nor a page of this host's served over plain HTTP) can set.
CONSOLE_COOKIE = "wxbot_console_{port}"
#: Sent with every console answer: no script runs (a reader's text shown by mistake as
#: markup would run nothing), nothing loads from elsewhere, no other site frames the page.
CONSOLE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]

CONSOLE_CSS = """
body{margin:0;font:16px/1.45 system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;
color:#0f172a;background:#fff}
nav{display:flex;flex-wrap:wrap;align-items:center;gap:.2rem .9rem;padding:.5rem 1rem;
background:#1e293b}
nav a{color:#f8fafc;text-decoration:none;padding:.2rem 0}
nav a.here{border-bottom:2px solid #38bdf8}
nav form{margin-left:auto}
nav button{background:none;border:1px solid #64748b;color:#f8fafc;border-radius:.3rem}
main{max-width:64rem;margin:0 auto;padding:0 1rem 2rem}
h1{font-size:1.35rem;margin:1rem 0 .5rem}
h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
a{color:#0369a1}
.wide{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{padding:.35rem .5rem;border-bottom:1px solid #e2e8f0;text-align:left;vertical-align:top}
th{background:#f8fafc;white-space:nowrap}
.n{text-align:right;white-space:nowrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(8.5rem,1fr));gap:.5rem}
.card{border:1px solid #e2e8f0;border-radius:.4rem;padding:.45rem .6rem}
.card b{display:block;font-size:1.35rem}
.card span{font-size:.8rem;color:#475569}
.said{white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word}
details.long summary{cursor:pointer;color:#0369a1;font-size:.85rem}
.turn{border-left:3px solid #94a3b8;padding:.2rem .7rem;margin:1rem 0}
.turn.waiting{border-left-color:#f59e0b;background:#fffbeb}
.turn.owner{border-left-color:#16a34a;background:#f0fdf4}
.reply{background:#f1f5f9;border-radius:.4rem;padding:.35rem .6rem;margin:.35rem 0}
.meta{font-size:.8rem;color:#475569}
.bad{color:#b91c1c}
.ok{color:#15803d}
.note{background:#ecfeff;border:1px solid #a5f3fc;border-radius:.4rem;padding:.5rem .7rem}
.box{border:1px solid #cbd5e1;border-radius:.4rem;padding:.6rem .8rem;margin:1rem 0}
svg{display:block;width:100%;height:auto;max-height:15rem}
input,button,textarea{font:inherit;padding:.4rem .6rem;border-radius:.3rem;border:1px solid #94a3b8}
button{background:#e2e8f0;cursor:pointer}
input[type=password],input[type=url],input[type=text],textarea{width:100%;max-width:40rem;
box-sizing:border-box}
textarea{min-height:5rem}
form.inline{display:inline}
.login{max-width:22rem;margin:15vh auto 0;padding:0 1rem}
.login p{margin:.7rem 0}
@media (max-width:40rem){
table.rows,table.rows tbody,table.rows tr,table.rows td{display:block}
table.rows tr:first-child{display:none}
table.rows tr{padding:.45rem 0;border-bottom:1px solid #e2e8f0}
table.rows td{border:0;padding:.1rem 0;text-align:left}
table.rows td[data-label]::before{content:attr(data-label) "：";color:#475569;font-size:.8rem}
}
""".strip()

CONSOLE_LAYOUT = """<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{{title}} · wxbot</title>
<link rel="stylesheet" href="/console.css">
</head><body>
% if csrf:
<nav>
% for path, name in pages:
<a href="{{path}}"{{!' class="here"' if path == here else ''}}>{{name}}</a>
% end
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{csrf}}">
<button>退出</button></form>
</nav>
% end
<main>
<h1>{{title}}</h1>
% if flash:
<p class="{{'bad' if flash[1] else 'note'}} said">{{flash[0]}}</p>
% end
{{!body}}
</main>
</body></html>
"""

CONSOLE_LOGIN = """<div class="login">
% if problem:
<p class="bad">{{problem}}</p>
% end
<form method="post" action="/login">
<p><label for="password">密码（WXBOT_ADMIN_PASSWORD）</label><br>
<input type="password" id="password" name="password" autocomplete="current-password" autofocus></p>
<p><button type="submit">登录</button></p>
</form>
</div>
"""

CONSOLE_OVERVIEW = """<h2>今天</h2>
<div class="cards">
% for name, value in cards:
<div class="card"><b>{{value}}</b><span>{{name}}</span></div>
% end
</div>
<h2>每天的消息</h2>
<svg viewBox="0 0 {{chart['width']}} {{chart['height']}}" role="img"
 aria-label="15 天里每天的消息，绿色是已回答的">
<line x1="0" y1="{{chart['base']}}" x2="{{chart['width']}}" y2="{{chart['base']}}" stroke="#94a3b8"/>
% for bar in chart['bars']:
<rect x="{{bar['x']}}" y="{{bar['y']}}" width="{{chart['bar']}}" height="{{bar['h']}}" fill="#cbd5e1">
<title>{{bar['day']}}：{{bar['messages']}} 条消息，已回答 {{bar['answered']}} 条</title></rect>
<rect x="{{bar['x']}}" y="{{bar['ay']}}" width="{{chart['bar']}}" height="{{bar['ah']}}" fill="#16a34a"/>
<text x="{{bar['x'] + chart['bar'] / 2}}" y="{{chart['height'] - 4}}" font-size="9"
 text-anchor="middle" fill="#475569">{{bar['label']}}</text>
% end
<text x="2" y="10" font-size="9" fill="#475569">{{chart['top']}}</text>
</svg>
<p class="meta">灰色：消息；绿色：已回答。本地时间，按自然日计算。</p>
<h2>每天明细</h2>
<div class="wide"><table class="rows">
<tr><th>日期</th><th class="n">消息</th><th class="n">读者</th><th class="n">已回答</th>
<th class="n">失败</th><th class="n">首条回复（中位）</th><th class="n">首条回复（95%）</th>
<th class="n">客服消息</th><th class="n">被动回复</th><th class="n">用到文章</th></tr>
% for day in days:
<tr><td data-label="日期">{{day['day']}}</td><td class="n" data-label="消息">{{day['messages']}}</td>
<td class="n" data-label="读者">{{day['people']}}</td>
<td class="n" data-label="已回答">{{day['answered']}}</td><td class="n" data-label="失败">{{day['failed']}}</td>
<td class="n" data-label="首条回复（中位）">{{seconds(day['first_median'])}}</td>
<td class="n" data-label="首条回复（95%）">{{seconds(day['first_p95'])}}</td>
<td class="n" data-label="客服消息">{{day['service']}}</td><td class="n" data-label="被动回复">{{day['passive']}}</td>
<td class="n" data-label="用到文章">{{articles_text(day)}}</td></tr>
% end
</table></div>
<p class="meta">消息：读者发来的（菜单点击和关注不算）。首条回复：从消息到达到回答的第一条发出。
客服消息：用客服消息接口发出的回答；被动回复：在回复读者消息时带出的回答。用到文章：
找到了公众号文章段落的问题 / 回答里引用了文章的。</p>
"""

CONSOLE_PEOPLE = """<p class="meta">最近发消息的读者，最新的在前（openid 已缩短）。</p>
<div class="wide"><table class="rows">
<tr><th>读者</th><th>最后一条消息</th><th class="n">时间</th><th>状态</th></tr>
% for person in people:
<tr><td data-label="读者"><a href="/people/{{quote(person['openid'])}}">{{short(person['openid'])}}</a></td>
<td class="said" data-label="消息">{{said(person)}}</td><td class="n" data-label="时间">{{when(person['received_at'])}}</td>
<td data-label="状态">{{state(person)}}</td></tr>
% end
</table></div>
% if not people:
<p>还没有消息。</p>
% end
"""

CONSOLE_CONVERSATION = """<p class="meta">读者 {{short(openid)}}：每条消息、为它发出的回复和时间，最早的在前。</p>
<div class="box" id="answer">
% if handed_until:
<p><b>由你回复中</b>：机器人到 {{when(handed_until)}} 之前不回答这位读者。</p>
<form method="post" action="/people/{{quote(openid)}}/give-back" class="inline">
<input type="hidden" name="csrf" value="{{csrf}}"><button>交还机器人</button></form>
% end
% if window:
<p class="meta">微信允许在 {{when(window.closes_at)}} 之前给这位读者发客服消息；读者这条消息的 5 条额度还剩 {{window.left}} 条。</p>
<form method="post" action="/people/{{quote(openid)}}/answer">
<input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="once" value="{{once}}">
<p><label for="text">亲自回复这位读者（回复后机器人暂停 {{hours}} 小时）</label><br>
<textarea id="text" name="text" required maxlength="10000">{{draft}}</textarea></p>
<p><button type="submit">发送</button></p>
</form>
% else:
<p class="meta">不能再发给这位读者：微信只允许在读者最后一条消息后 48 小时内发客服消息，等他再发消息后才能回复。</p>
% end
</div>
% if older:
<p><a href="/people/{{quote(openid)}}?before={{older}}">更早的消息</a></p>
% end
% for turn in turns:
% if turn.get('owner'):
<div class="turn owner"><div class="meta">你亲自回复 · {{when(turn['sent_at'])}}</div>
<div class="said">{{!shown(turn['content'])}}</div></div>
% continue
% end
<div class="turn{{' waiting' if turn['waiting'] else ''}}" id="m{{turn['id']}}">
<div class="meta">#{{turn['id']}} · {{when(turn['received_at'])}} · {{state(turn)}}{{'' if turn['first'] is None else ' · 首条回复用时 ' + seconds(turn['first'])}}</div>
<div class="said">{{!shown(said(turn))}}</div>
% if turn['acknowledged']:
<div class="meta">{{turn['acknowledged']}}</div>
% end
% if turn['merged_into']:
<div class="meta">与 <a href="#m{{turn['merged_into']}}">#{{turn['merged_into']}}</a> 一起回答</div>
% end
% for reply in turn['replies']:
<div class="reply"><div class="meta">{{reply['how']}}</div><div class="said">{{!shown(reply['content'])}}</div></div>
% end
% if turn['error']:
<div class="bad said">{{turn['error']}}</div>
% end
% if turn['failures']:
<div class="meta bad">{{turn['failures']}}</div>
% end
% if turn['state'] in ('failed', 'dead'):
<form method="post" action="/queue/retry" class="inline">
<input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="id" value="{{turn['id']}}">
<button>重试</button></form>
% end
</div>
% end
% if not turns:
<p>这位读者没有消息。</p>
% end
"""

CONSOLE_QUESTIONS = """% for anchor, heading, about, uncovered, none in gaps:
<h2 id="{{anchor}}">{{heading}}</h2>
<p class="meta">{{about}}写下答案，机器人以后就按它回答，并注明「来源：公众号说明」。</p>
% for number, question in enumerate(uncovered):
<div class="box">
<div class="meta">{{when(question['received_at'])}} · {{question['count']}} 次 · {{len(question['openids'])}} 位读者 ·
<a href="/people/{{quote(question['openid'])}}#m{{question['id']}}">{{short(question['openid'])}}</a></div>
<div class="said">{{!shown(question['content'])}}</div>
<details><summary>写答案</summary>
<form method="post" action="/questions/teach">
<input type="hidden" name="csrf" value="{{csrf}}">
<input type="hidden" name="question" value="{{question['content']}}">
<p><label for="answer-{{anchor}}{{number}}">答案</label><br>
<textarea id="answer-{{anchor}}{{number}}" name="answer" required maxlength="20000"></textarea></p>
<p><button type="submit">保存答案</button></p>
</form></details>
</div>
% end
% if not uncovered:
<p>{{none}}</p>
% end
% end
<h2>问得最多</h2>
<p class="meta">最近 {{window}} 个问题里，同样的文字（标点、全半角、大小写不计）问过不止一次的。</p>
<div class="wide"><table class="rows">
<tr><th class="n">次数</th><th>问题</th></tr>
% for count, text in most:
<tr><td class="n" data-label="次数">{{count}}</td><td class="said" data-label="问题">{{!shown(text)}}</td></tr>
% end
</table></div>
% if not most:
<p>还没有问题被问过两次。</p>
% end
<h2>最近的问题</h2>
<div class="wide"><table class="rows">
<tr><th class="n">时间</th><th>读者</th><th>问题</th><th>状态</th></tr>
% for question in recent:
<tr><td class="n" data-label="时间">{{when(question['received_at'])}}</td>
<td data-label="读者"><a href="/people/{{quote(question['openid'])}}#m{{question['id']}}">{{short(question['openid'])}}</a></td>
<td class="said" data-label="问题">{{!shown(question['content'])}}</td><td data-label="状态">{{state(question)}}</td></tr>
% end
</table></div>
"""

CONSOLE_QUEUE = """% for title, state_name, total, rows in states:
<h2>{{title}}：{{total}} 条</h2>
% if rows:
<div class="wide"><table class="rows">
<tr><th class="n">#</th><th class="n">收到</th><th>读者</th><th>消息</th><th>原因</th>
{{!'<th></th>' if state_name in ('dead', 'failed') else ''}}</tr>
% for row in rows:
<tr><td class="n" data-label="#">{{row['id']}}</td><td class="n" data-label="收到">{{when(row['received_at'])}}</td>
<td data-label="读者"><a href="/people/{{quote(row['openid'])}}#m{{row['id']}}">{{short(row['openid'])}}</a></td>
<td class="said" data-label="消息">{{!shown(said(row))}}</td><td class="said" data-label="原因">{{why(row)}}</td>
% if state_name in ('dead', 'failed'):
<td><form method="post" action="/queue/retry" class="inline">
<input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="id" value="{{row['id']}}">
<button>重试</button></form></td>
% end
</tr>
% end
</table></div>
% if total > len(rows):
<p class="meta">还有 {{total - len(rows)}} 条（python wxbot.py status 列出全部）</p>
% end
% end
% end
"""

CONSOLE_ARTICLES = """<p>{{total}} 个来源，{{passages}} 段。
% if synced:
已发布文章上次同步于 {{when(synced)}}。
% else:
已发布文章还没同步过（python wxbot.py learn --published）。
% end
</p>
<h2>学习一个网页</h2>
<form method="post" action="/articles/learn">
<input type="hidden" name="csrf" value="{{csrf}}">
<p><label for="url">文章或网页的地址</label><br>
<input type="url" id="url" name="url" required value="{{url}}" placeholder="https://mp.weixin.qq.com/s/..."></p>
<p><button type="submit">学习</button></p>
</form>
<h2>来源</h2>
<div class="wide"><table class="rows">
<tr><th>标题</th><th>类型</th><th>日期</th><th class="n">段落</th><th>学习于</th><th></th></tr>
% for source in sources:
% if source['url'].startswith(('https://', 'http://')):
<tr><td data-label="标题"><a href="{{source['url']}}" rel="noreferrer">{{source['title']}}</a></td>
% else:
<tr><td data-label="标题">{{source['title']}}</td>
% end
<td data-label="类型">{{kinds.get(source['kind'], source['kind'])}}</td><td data-label="日期">{{source['date'] or '–'}}</td>
<td class="n" data-label="段落"><a href="/articles/{{source['id']}}">{{source['passages']}} 段{{'，修改' if source['kind'] == 'note' else ''}}</a></td>
<td class="n" data-label="学习于">{{when(source['learned_at'])}}</td>
<td><form method="post" action="/articles/forget" class="inline">
<input type="hidden" name="csrf" value="{{csrf}}"><input type="hidden" name="id" value="{{source['id']}}">
<button>删除</button></form></td></tr>
% end
</table></div>
% if total > len(sources):
<p class="meta">还有 {{total - len(sources)}} 个更早的（python wxbot.py learn --list）</p>
% end
"""

CONSOLE_PASSAGES = """<p class="meta">{{' · '.join(facts)}}</p>
% if source['url'].startswith(('https://', 'http://')):
<p><a href="{{source['url']}}" rel="noreferrer">{{source['url']}}</a></p>
% end
% if source['kind'] == 'note':
<div class="box">
<form method="post" action="/articles/{{source['id']}}/note">
<input type="hidden" name="csrf" value="{{csrf}}">
<p><label for="question">问题</label><br>
<input type="text" id="question" name="question" required maxlength="500" value="{{source['title']}}"></p>
<p><label for="answer">答案</label><br>
<textarea id="answer" name="answer" required maxlength="20000">{{note_text}}</textarea></p>
<p><button type="submit">保存修改</button></p>
</form>
% if askers:
<form method="post" action="/articles/{{source['id']}}/send">
<input type="hidden" name="csrf" value="{{csrf}}">
<p>48 小时内问过这个问题、还没收到这条答案的读者：{{len(askers)}} 位。
<button>把答案发给他们</button></p>
</form>
% else:
<p class="meta">48 小时内没有其他问过这个问题、还没收到答案的读者。</p>
% end
</div>
% end
% for number, passage in enumerate(passages, 1):
<div class="reply"><div class="meta">第 {{number}} 段</div><div class="said">{{passage['text']}}</div></div>
% end
"""

CONSOLE_SETTINGS = """<h2>店主的文件</h2>
<div class="wide"><table class="rows">
<tr><th>设置</th><th>文件</th><th>状态</th></tr>
% for env, path, state_text, good in files:
<tr><td data-label="设置">{{env}}</td><td class="said" data-label="文件">{{path or '未设置'}}</td><td class="{{'ok' if good else 'bad'}} said" data-label="状态">{{state_text}}</td></tr>
% end
</table></div>
<h2>生效的设置</h2>
<p class="meta">服务启动时读到的值；密钥只显示“已设置”。标“默认”的是没有改过的。</p>
<div class="wide"><table class="rows">
<tr><th>变量</th><th>值</th></tr>
% for env, value, default in settings:
<tr><td data-label="变量">{{env}}</td><td class="said" data-label="值">{{!shown(value)}}{{!' <span class="meta">（默认）</span>' if default else ''}}</td></tr>
% end
</table></div>
"""


def from_proxy(environ: Mapping, proxies: Sequence[str]) -> bool:
    """Whether the peer is a proxy the owner named (WXBOT_TRUSTED_PROXIES): its forwarded
    headers are believed; anyone else's could be written by the client itself (through an
    SSH tunnel every local user is a loopback peer)."""
    return trusted_proxy(environ.get("REMOTE_ADDR", ""), proxies)


def trusted_proxy(address: str, proxies: Sequence[str]) -> bool:
    """Whether an address is in WXBOT_TRUSTED_PROXIES."""
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(peer in ipaddress.ip_network(proxy) for proxy in proxies)


def client_address(environ: Mapping, proxies: Sequence[str] = ()) -> str:
    """Who sent a request: the peer, or the address a trusted proxy names (nginx's X-Real-IP)
    when it is an IP address (nothing else reaches the log)."""
    peer = environ.get("REMOTE_ADDR", "")
    if not from_proxy(environ, proxies):
        return peer
    try:
        return str(ipaddress.ip_address(environ.get("HTTP_X_REAL_IP", "").strip()))
    except ValueError:
        return peer


def host_name(url: str) -> str:
    """The host an URL (or "//Host: header") names, lower case; "" for none or a bad one."""
    try:
        return urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return ""


#: What the admin listener answers (421) a request naming another host than its own.
NOT_OWN_HOST = ("the admin listener answers to localhost or its IP address; behind a proxy, "
                "name the proxy in WXBOT_TRUSTED_PROXIES")


def own_host(environ: Mapping, proxies: Sequence[str]) -> bool:
    """Whether a request names the admin listener (console, /metrics) as its host: localhost
    or an IP address (what the owner's browser names through an SSH tunnel), or any name
    through a named proxy (it answers for its own names). A page of another site whose name
    was made to point at 127.0.0.1 (DNS rebinding) names its own, and is refused."""
    if from_proxy(environ, proxies):
        return True
    name = host_name("//" + environ.get("HTTP_HOST", ""))
    with contextlib.suppress(ValueError):
        return name == "localhost" or bool(ipaddress.ip_address(name))
    return False


def over_https(environ: Mapping, proxies: Sequence[str] = ()) -> bool:
    """Whether the browser reached the console over HTTPS: directly, or through a trusted
    proxy that says so (X-Forwarded-Proto)."""
    return environ.get("wsgi.url_scheme") == "https" or (
        from_proxy(environ, proxies) and
        environ.get("HTTP_X_FORWARDED_PROTO", "").lower() == "https")


def local_address(address: str) -> bool:
    """Whether an address (or the name localhost) is this machine's loopback."""
    try:
        return address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class ConsoleGuard:
    """The console's door: the password compared in constant time, at most 5 wrong tries a
    minute from one address (an IPv6 /64, address_group), sessions of 12 hours each with a token of its own that every
    form sends back (a page of another site cannot know it)."""

    #: Addresses remembered for their wrong tries; beyond it the one that tried least
    #: recently is forgotten (each wrong try costs the same however many are remembered).
    ADDRESSES = 10000

    def __init__(self, password: str):
        self.password = password.encode("utf-8")
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[float, str]] = {}  # cookie: (ends at, form token)
        # address: times of its last wrong tries, the least recent address first
        self._wrong: collections.OrderedDict[str, collections.deque] = \
            collections.OrderedDict()
        # Times of the last wrong tries from anyone: addresses are many (rotated in a
        # header, an IPv6 subscriber's /64s); guesses are not.
        self._anyone = collections.deque(maxlen=CONSOLE_WRONG_TOTAL)

    def refused(self, address: str, now: float) -> bool:
        """Whether this address tried CONSOLE_WRONG_TRIES wrong passwords within the last
        minute, or all addresses together CONSOLE_WRONG_TOTAL."""
        with self._lock:
            tries = self._wrong.get(address_group(address), ())
            return any(len(times) == times.maxlen and times[0] > now - 60
                       for times in (tries, self._anyone) if times)

    def log_in(self, address: str, password: str, now: float) -> str | None:
        """A new session's cookie for the right password; None for a wrong one (counted)."""
        if hmac.compare_digest(password.encode("utf-8", "replace"), self.password):
            cookie = secrets.token_urlsafe(32)
            with self._lock:
                self._sessions = {key: value for key, value in self._sessions.items()
                                  if value[0] > now}
                self._sessions[cookie] = (now + CONSOLE_SESSION_SECONDS,
                                          secrets.token_urlsafe(32))
            return cookie
        with self._lock:
            key = address_group(address)
            tries = self._wrong.pop(key, None) or collections.deque(maxlen=CONSOLE_WRONG_TRIES)
            tries.append(now)
            self._wrong[key] = tries
            if len(self._wrong) > self.ADDRESSES:
                self._wrong.popitem(last=False)
            self._anyone.append(now)
        return None

    def session(self, cookie: str | None, now: float) -> str | None:
        """The form token of the session this cookie opened, while it lasts."""
        with self._lock:
            ends_at, token = self._sessions.get(cookie or "", (0.0, ""))
        return token if ends_at > now else None

    def log_out(self, cookie: str | None) -> None:
        with self._lock:
            self._sessions.pop(cookie or "", None)


class OwnerConsole:
    """The owner's web console (WXBOT_ADMIN_PASSWORD): what readers ask, how they were
    answered, the queue with a retry for dead messages, the articles, the settings.

    Served on a listener of its own (WXBOT_ADMIN_HOST:WXBOT_ADMIN_PORT), from the bot's
    database; every page reads a bounded number of rows through an index, so that it answers
    in milliseconds however many messages are stored.
    """

    PAGES = [("/", "概览"), ("/people", "对话"), ("/questions", "问题"),
             ("/queue", "队列"), ("/articles", "文章"), ("/settings", "设置")]

    def __init__(self, settings: Settings, store: Store, owner: OwnerFiles, wakeup: Wakeup,
                 articles: Articles | None = None, clock: Callable[[], float] = time.time,
                 handoff: Handoff | None = None, wechat: "WeChatAPI | None" = None):
        self.settings, self.store, self.owner, self.wakeup = settings, store, owner, wakeup
        self.articles, self.clock = articles, clock
        self.handoff = handoff or Handoff(settings, store)
        self.wechat = wechat or WeChatAPI(settings, store)
        self.guard = ConsoleGuard(settings.admin_password)
        #: What the page after a POST says (redirect after POST), by session cookie: the
        #: line, whether it is a failure, and the field to fill again.
        self._flash: dict[str, tuple[str, bool, str, str]] = {}
        self.refusals = LogThrottle()  # refused logins come at an attacker's pace; lines do not
        #: Each unsettled day's tally so far, by its midnight (today's, and yesterday's in
        #: the hour after midnight).
        self._settled: dict[float, dict] = {}
        self._counting = threading.Lock()
        self.templates = {name: bottle.SimpleTemplate(source) for name, source in [
            ("layout", CONSOLE_LAYOUT), ("login", CONSOLE_LOGIN),
            ("overview", CONSOLE_OVERVIEW), ("people", CONSOLE_PEOPLE),
            ("conversation", CONSOLE_CONVERSATION), ("questions", CONSOLE_QUESTIONS),
            ("queue", CONSOLE_QUEUE), ("articles", CONSOLE_ARTICLES),
            ("passages", CONSOLE_PASSAGES),
            ("settings", CONSOLE_SETTINGS)]}

    # Figures -----------------------------------------------------------------

    @staticmethod
    def midnight(now: float, days_back: int = 0) -> float:
        """Local midnight starting the day `days_back` days before the one of `now`."""
        year, month, day = time.localtime(now)[:3]
        return time.mktime((year, month, day - days_back, 0, 0, 0, 0, 0, -1))

    def tally(self, start: float, end: float) -> dict:
        """What readers wrote between two moments, how it was answered and how fast: the
        sums a day's figures are made of, ending at `end` ("until")."""
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT m.openid, m.state, m.received_at,"
                " (SELECT min(sent_at) FROM segments WHERE message_id = m.id),"
                " EXISTS (SELECT 1 FROM segments WHERE message_id = m.id"
                " AND replied_to IS NOT NULL AND sent_at IS NOT NULL)"
                " FROM messages m WHERE m.received_at >= ? AND m.received_at < ?"
                " AND m.msg_type != 'event'", (start, end)).fetchall()
            # Articles.uses_since counts up to now; a day is counted between its bounds.
            uses = conn.execute(
                "SELECT coalesce(sum(given > 0), 0), coalesce(sum(cited > 0), 0)"
                " FROM article_uses WHERE at >= ? AND at < ?",
                (start, end)).fetchone() if self.articles else (0, 0)
        return {
            "messages": len(rows), "openids": {row[0] for row in rows},
            "answered": sum(row[1] == State.DONE.value for row in rows),
            "failed": sum(row[1] in (State.FAILED.value, State.DEAD.value) for row in rows),
            "waits": [row[3] - row[2] for row in rows if row[3] is not None],
            "service": sum(row[3] is not None and not row[4] for row in rows),
            "passive": sum(bool(row[4]) for row in rows),
            "given": uses[0], "cited": uses[1], "until": end,
        }

    @staticmethod
    def added(tally: dict, more: dict) -> dict:
        """Two tallies of consecutive spans as one."""
        return {key: value | more[key] if key == "openids" else more[key] if key == "until"
                else value + more[key] for key, value in tally.items()}

    @staticmethod
    def figures(tally: dict) -> dict:
        """A day's figures from its tally, as the Overview shows them."""
        waits = sorted(tally["waits"])
        return {
            **{key: tally[key] for key in ("messages", "answered", "failed", "service",
                                           "passive", "given", "cited")},
            "people": len(tally["openids"]),
            "first_median": statistics.median(waits) if waits else None,
            "first_p95": waits[math.ceil(0.95 * len(waits)) - 1] if waits else None,
        }

    def day(self, start: float, end: float, now: float) -> dict:
        """One day's figures. The messages of over CONSOLE_DAY_SETTLED ago are added to the
        day's tally once and kept in memory; only the latest are read at each look. A day
        whose every message is settled is kept in the database, and read from there."""
        key = CONSOLE_DAY_KEY.format(time.strftime("%Y-%m-%d", time.localtime(start)))
        kept = self.store.get_kv(key, now)
        if kept:
            return json.loads(kept)
        settled = self._settled.get(start) or self.tally(start, start)
        upto = min(end, now - CONSOLE_DAY_SETTLED)
        if upto > settled["until"]:
            settled = self.added(settled, self.tally(settled["until"], upto))
        if upto >= end:
            self._settled.pop(start, None)
            figures = self.figures(settled)
            self.store.set_kv(key, json.dumps(figures), end + (CONSOLE_DAYS + 2) * 86400)
            return figures
        self._settled[start] = settled
        return self.figures(self.added(settled, self.tally(settled["until"],
                                                           min(end, now + 1))))

    def overview(self, now: float) -> list[dict]:
        """Today and the 14 days before, oldest first."""
        with self._counting:
            days = [{"day": time.strftime("%Y-%m-%d", time.localtime(self.midnight(now, back))),
                     **self.day(self.midnight(now, back), self.midnight(now, back - 1), now)}
                    for back in range(CONSOLE_DAYS, -1, -1)]
            for start in [start for start in self._settled if start < self.midnight(now, 1)]:
                del self._settled[start]  # a day that left the window unsettled
        return days

    def count_days(self) -> None:
        """Count the past days not yet counted, and today's settled messages: at start, in
        a thread of its own, so that the owner's first look is as quick as the next."""
        try:
            self.overview(self.clock())
        except sqlite3.Error as error:
            log.warning("the console's Overview figures were not counted at start: %s", error)

    def people(self) -> list[sqlite3.Row]:
        """The latest message of each of the people who wrote last, latest first."""
        latest: dict[str, sqlite3.Row] = {}
        before, read = 2 ** 63 - 1, 0
        with self.store.connection() as conn:
            while len(latest) < CONSOLE_ROWS and read < CONSOLE_PEOPLE_READ:
                rows = conn.execute(
                    "SELECT id, openid, msg_type, event, content, received_at, state"
                    " FROM messages WHERE id < ? ORDER BY id DESC LIMIT 500",
                    (before,)).fetchall()
                for row in rows:
                    latest.setdefault(row["openid"], row)
                    if len(latest) == CONSOLE_ROWS:
                        break
                if len(rows) < 500:
                    break
                before, read = rows[-1]["id"], read + len(rows)
        return list(latest.values())

    def conversation(self, openid: str, before: int) -> tuple[list[dict], int | None]:
        """One reader's messages before the id `before`, oldest first, each with what was
        sent for it; and the id to read older ones before (None: there are none)."""
        with self.store.connection() as conn:
            # State by state, each in the order of the index messages_user (openid, state,
            # id): a reader with a hundred thousand messages costs no sort of them all.
            rows = sorted((row for state in State for row in conn.execute(
                "SELECT id, msg_type, event, content, received_at, state, error, merged_into,"
                " needs_model, model_failures, delivery_failures, interruptions"
                " FROM messages WHERE openid = ? AND state = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?", (openid, state.value, before, CONSOLE_ROWS + 1))),
                key=lambda row: row["id"], reverse=True)[:CONSOLE_ROWS + 1]
            older = rows[CONSOLE_ROWS - 1]["id"] if len(rows) > CONSOLE_ROWS else None
            rows = rows[:CONSOLE_ROWS][::-1]
            ids = [row["id"] for row in rows]
            marks = ",".join("?" * len(ids))
            segments = conn.execute(
                f"SELECT message_id, seq, content, carried, sent_at, replied_to, moved_to, image,"
                f" card FROM segments WHERE message_id IN ({marks}) ORDER BY message_id, seq",
                ids).fetchall()
            lines = dict(conn.execute(
                f"SELECT key, value FROM kv WHERE key IN ({marks})",
                [QUEUE_LINE_KEY.format(message_id) for message_id in ids]).fetchall())
        replies: dict[int, list[dict]] = collections.defaultdict(list)
        first: dict[int, float] = {}
        waiting = self.handoff.waiting(openid)
        for segment in segments:
            if segment["sent_at"] is not None:
                first.setdefault(segment["message_id"], segment["sent_at"])
            replies[segment["message_id"]].append(
                {"content": segment["content"], "how": self.how_sent(segment)})
        turns = []
        for row in rows:
            line = lines.get(QUEUE_LINE_KEY.format(row["id"]))
            passive = any(segment["replied_to"] is not None for segment in segments
                          if segment["message_id"] == row["id"])
            turns.append({
                **dict(row), "replies": replies[row["id"]],
                "first": first[row["id"]] - row["received_at"] if row["id"] in first else None,
                "acknowledged": f"{clock_text(float(line))} 发出了排队提示" if line else
                # Not stored: the Acknowledger shows typing for each such message it has no
                # queue line for, in service mode.
                "写回答时显示了“对方正在输入”" if row["needs_model"] and
                row["msg_type"] != "event" and row["id"] in first and not passive else "",
                "failures": "，".join(f"{name} {row[column]} 次" for name, column in [
                    ("模型失败", "model_failures"), ("发送失败", "delivery_failures"),
                    ("中断", "interruptions")] if row[column]),
                "waiting": row["id"] in waiting,
            })
        # The owner's own messages, in their place among the reader's.
        owned = self.handoff.owner_messages(openid, rows[0]["received_at"] if rows and older
                                            else 0)
        if before < 2 ** 63 - 1 and rows:  # an older page: up to its last message
            owned = [row for row in owned if row["sent_at"] <= rows[-1]["received_at"]]
        merged = sorted([(turn["received_at"], 0, turn) for turn in turns] + [
            (row["sent_at"], 1, {"owner": True, "content": row["content"],
                                 "sent_at": row["sent_at"]}) for row in owned],
            key=lambda item: item[:2])
        return [turn for _, _, turn in merged], older

    @staticmethod
    def how_sent(segment: sqlite3.Row) -> str:
        """Which message of WeChat's carried a segment of an answer, and when."""
        what = f"第 {segment['seq'] + 1} 条" + ("（图片）" if segment["image"] else "") \
            + ("（文章卡片）" if segment["card"] else "") \
            + ("（接着之前的回答）" if segment["carried"] else "")
        if segment["moved_to"] is not None:
            return f"{what}：移到了 #{segment['moved_to']} 的回答里"
        if segment["sent_at"] is None:
            return f"{what}：未发出"
        by = (f"随 #{segment['replied_to']} 的被动回复" if segment["replied_to"] is not None
              else "用客服消息")
        return f"{what}：{clock_text(segment['sent_at'])} {by}发出"

    def questions(self) -> tuple[list[sqlite3.Row], list[tuple[int, str]]]:
        """The latest questions (commands and keywords aside), and the texts asked most often
        among them, counted by their normalised form."""
        keywords = self.owner.replies.keywords
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT id, openid, msg_type, content, received_at, state FROM messages"
                " WHERE id < ? AND msg_type IN ('text', 'voice') AND content IS NOT NULL"
                " ORDER BY id DESC LIMIT ?", (2 ** 63 - 1, CONSOLE_ASKED)).fetchall()
        asked = [row for row in rows if classify(row["msg_type"], row["content"], keywords,
                                                 bool(self.settings.image_model)).kind
                 is Kind.QUESTION]
        counts, shown = collections.Counter(), {}
        for row in asked:  # each text shown as a reader wrote it most recently
            form = normalise(row["content"])
            counts[form] += 1
            shown.setdefault(form, row["content"])
        most = [(count, shown[text]) for text, count in counts.most_common(20) if count > 1]
        return asked[:CONSOLE_ROWS], most

    def uncovered(self, missed: bool = False) -> list[dict]:
        """The questions of the last week no passage of the articles was found for, small
        talk aside, each text once, the latest first; `missed`: those whose answer cited none
        of the passages found (uncovered_questions)."""
        with self.store.connection() as conn:
            return uncovered_questions(conn, self.clock() - 7 * 86400,
                                       missed=missed)[:CONSOLE_ROWS]

    def sources(self) -> tuple[list[sqlite3.Row], int, int, float | None]:
        """The articles learned, newest first (a page of them), how many sources and
        passages in all, and when the published ones were last synced. Read through the
        store's pooled connections: a request's thread is gone once it answered."""
        with self.store.connection() as conn:
            sources = conn.execute(
                "SELECT id, kind, title, url, date, passages, learned_at FROM article_sources"
                " ORDER BY date DESC, id DESC LIMIT ?", (CONSOLE_ROWS * 4,)).fetchall()
            total, passages = conn.execute(
                "SELECT count(*), coalesce(sum(passages), 0) FROM article_sources").fetchone()
            synced = conn.execute("SELECT value FROM article_state WHERE key = 'synced'"
                                  ).fetchone()
        return sources, total, passages, float(synced[0]) if synced else None

    def passages(self, source_id: int) -> tuple[sqlite3.Row | None, list[sqlite3.Row]]:
        """One learned source and its passages, in order."""
        with self.store.connection() as conn:
            source = conn.execute("SELECT id, kind, title, url, date, learned_at FROM"
                                  " article_sources WHERE id = ?", (source_id,)).fetchone()
            return source, conn.execute("SELECT text FROM article_passages WHERE source_id = ?"
                                        " ORDER BY id", (source_id,)).fetchall()

    def learn(self, url: str) -> str:
        """Learn a page (the CLI's `learn URL`); what was learned, for the owner."""
        source = self.articles.learn(url)
        log.info("learned %s from the console: %d passages", url, source.passages)
        return f"已学习《{source.title}》：{source.passages} 段。"

    def teach(self, question: str, answer: str, source_id: int | None = None) -> Source:
        """Keep the owner's answer to a question as a note, found like an article (and
        replace the note `source_id`, edited)."""
        origin = f"{NOTE_URL}{normalise(question)}"
        if source_id is not None:
            with self.store.connection() as conn:
                row = conn.execute("SELECT origin FROM article_sources WHERE id = ? AND"
                                   " kind = 'note'", (source_id,)).fetchone()
            if row is None:
                raise LearnError("这条说明已经不在了")
            if row[0] != origin:
                self.articles.forget(row[0])
        note = self.articles.learn_text("note", origin, question, answer, url=NOTE_URL,
                                        date=time.strftime("%Y-%m-%d",
                                                           time.localtime(self.clock())))
        log.info("the owner's note %d kept from the console (%d passages)", note.id,
                 note.passages)
        return note

    def askers(self, note_id: int, question: str) -> list[str]:
        """The readers who asked a note's question (by its normalised form) in the last
        48 h, no article covering it, and have not been sent the note."""
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT m.openid, m.content FROM article_uses u JOIN messages m ON"
                " m.id = u.message_id WHERE u.given = 0 AND u.at >= ? ORDER BY u.at DESC"
                " LIMIT 1000", (self.clock() - WINDOW_SECONDS,)).fetchall()
        form, found = normalise(question), []
        text = self.note_text(self.passages(note_id)[1])
        for row in rows:
            if row["content"] and normalise(row["content"]) == form and \
                    row["openid"] not in found and not self.handoff.sent_note(
                        note_id, row["openid"], text):
                found.append(row["openid"])
        return found

    def send_note(self, note_id: int) -> tuple[int, list[str]]:
        """Send a note to the readers who asked it (askers()), each once, within their
        quota: how many got it, and why the others did not."""
        source, passages = self.passages(note_id)
        if source is None or source["kind"] != "note":
            return 0, ["这条说明已经不在了"]
        text = self.note_text(passages)
        sent, problems = 0, []
        for openid in self.askers(note_id, source["title"]):
            try:
                self.handoff.answer(self.wechat, openid, text, self.clock(), note_id=note_id)
                sent += 1
            except OwnerSendError as error:
                problems.append(f"{short_id(openid)}：{error}")
        return sent, problems

    @staticmethod
    def note_text(passages: list[sqlite3.Row]) -> str:
        return "\n\n".join(passage["text"] for passage in passages)

    def queue(self) -> list[tuple[str, str, int, list[sqlite3.Row]]]:
        """Waiting, in progress and dead messages: how many, and the first of each."""
        with self.store.connection() as conn:
            counts = dict(conn.execute("SELECT state, messages FROM state_counts").fetchall())
            found = []
            for state, order in [(State.QUEUED, "ASC"), (State.LEASED, "ASC"),
                                 (State.DEAD, "DESC"), (State.FAILED, "DESC")]:
                rows = conn.execute(
                    f"SELECT id, openid, msg_type, event, content, received_at, not_before,"
                    f" lease_until, state, error, model_failures, delivery_failures, interruptions"
                    f" FROM messages WHERE state = ? ORDER BY id {order} LIMIT ?",
                    (state.value, CONSOLE_ROWS)).fetchall()
                found.append((STATE_WORDS[state], state.value, counts.get(state.value, 0),
                              rows))
        return found

    def retry(self, message_id: int) -> str | None:
        """Ask a dead or failed message again, as `python wxbot.py retry ID` does, and wake a
        worker for it; None when queued, else why not."""
        with self.store.transaction() as conn:
            refused = requeue(conn, message_id, self.clock())
        if refused is None:
            log.info("message %d queued again from the console", message_id)
            self.wakeup.notify()
            return None
        return f"是{STATE_WORDS[State(refused)]}，无需重试" if refused else "不在数据库里"

    def files(self) -> list[tuple[str, str, str, bool]]:
        """The owner's files: (setting, path, what is in force or what is wrong, fine)."""
        shown = []
        for env, owner_file, read in [
                ("WXBOT_REPLIES", self.owner.replies_file, Replies.read),
                ("WXBOT_BLOCKED_WORDS", self.owner.blocked_file, BlockedWords.read)]:
            if not owner_file.path:
                shown.append((env, "", "未设置", True))
                continue
            try:
                shown.append((env, owner_file.path, f"生效中：{read(owner_file.path).describe()}",
                              True))
            except FileProblem as error:
                shown.append((env, owner_file.path, "没有用：它有问题，之前读到的版本继续生效："
                              + "；".join(error.problems), False))
        return shown

    # Web ---------------------------------------------------------------------

    def render(self, name: str, title: str, csrf: str = "", **values) -> str:
        flash = self._flash.pop(bottle.request.get_cookie(self.cookie_name()) or "", None) \
            if csrf else None
        body = self.templates[name].render(
            csrf=csrf, when=clock_text, seconds=seconds_text, short=short_id,
            quote=urllib.parse.quote, said=said_text, state=state_text, shown=shown_html,
            **values)
        return self.templates["layout"].render(title=title, csrf=csrf, body=body,
                                               pages=self.PAGES, flash=flash,
                                               here=bottle.request.path)

    def after_post(self, location: str, line: str = "", failed: bool = False,
                   field: str = "") -> bottle.HTTPResponse:
        """Redirect after a POST (reloading the page sends nothing again); the next page
        says `line`, and the page redirected to (only) fills `field` in again."""
        if line:
            cookie = bottle.request.get_cookie(self.cookie_name()) or ""
            if len(self._flash) > 1000:  # sessions that never looked again
                self._flash.clear()
            self._flash[cookie] = (line, failed, field,
                                   urllib.parse.unquote(location.split("#")[0]))
        return bottle.HTTPResponse(status=303, Location=location)

    def field(self) -> str:
        """The field a failed POST asked to fill in again (after_post), if it is still due."""
        flash = self._flash.get(bottle.request.get_cookie(self.cookie_name()) or "")
        # Another reader's page, opened before the redirect came: not their words.
        return flash[2] if flash and bottle.request.path == flash[3] else ""

    def settings_shown(self) -> list[tuple[str, str, bool]]:
        """Each setting as the owner reads it: its value in words (secrets as 已设置), and
        whether it is the default. The prompt and the welcome are no secrets: shown."""
        shown = []
        for name, setting in SETTINGS.items():
            value = getattr(self.settings, name)
            default = setting.default is not None and value == setting.parse(setting.default)
            if setting.secret:
                text = "已设置" if value else "未设置"
            elif isinstance(value, bool):
                text = "开" if value else "关"
            elif isinstance(value, float):
                text = f"{value:g}"
            elif isinstance(value, tuple):
                text = "，".join(short_id(item) if name == "admins" else item
                                for item in value) or "（空）"
            elif setting.parse in (_url, _optional_url):
                text = masked_url(value) or "（空）"
            else:
                text = str(value) if value != "" else "（空）"
            shown.append((setting.env, text, default))
        return shown

    def app(self):
        """The console's WSGI app: bottle routes behind the login, with CONSOLE_HEADERS."""
        app = bottle.Bottle(catchall=True)
        app.install(logged_not_printed)
        app.install(self.door)
        console = self

        @app.get("/console.css", open=True)
        def css():
            return bottle.HTTPResponse(CONSOLE_CSS, 200, {
                "Content-Type": "text/css; charset=utf-8", "Cache-Control": "max-age=3600"})

        @app.get("/favicon.ico", open=True)
        def no_icon():  # browsers ask; a 404 would be an error in the browser's console
            return bottle.HTTPResponse(status=204)

        @app.get("/login", open=True)
        def login_form():
            return console.render("login", "wxbot 控制台", problem="")

        @app.post("/login", open=True)
        def log_in():
            if console.cross_site():
                # A page of another site posting guesses through the owner's browser: not
                # counted, or five would lock the owner out.
                return bottle.HTTPResponse("a login from another site's page is refused", 403)
            now = console.clock()
            address = client_address(bottle.request.environ, console.settings.trusted_proxies)
            if console.guard.refused(address, now):
                held = console.refusals.allow(address, now)
                if held is not None:
                    log_web.warning("console logins from %s refused for a minute: %d wrong "
                                    "passwords from it, or %d from all addresses (%d more "
                                    "tries since the last such line)", address,
                                    CONSOLE_WRONG_TRIES, CONSOLE_WRONG_TOTAL, held)
                return bottle.HTTPResponse(console.render(
                    "login", "wxbot 控制台", problem="密码错误次数太多，请等一分钟再试。"), 429)
            cookie = console.guard.log_in(
                address, bottle.request.forms.getunicode("password") or "", now)
            if cookie is None:  # the 5 a minute allowed are all logged
                log_web.warning("console: wrong password from %s", address)
                return bottle.HTTPResponse(console.render(
                    "login", "wxbot 控制台", problem="密码不对。"), 401)
            log_web.info("console: logged in from %s", address)
            answer = bottle.HTTPResponse(status=303, Location="/")
            answer.set_cookie(console.cookie_name(), cookie, httponly=True, samesite="strict",
                              secure=console.secure(), path="/",
                              maxage=CONSOLE_SESSION_SECONDS)
            return answer

        @app.post("/logout")
        def log_out():
            console.guard.log_out(bottle.request.get_cookie(console.cookie_name()))
            answer = bottle.HTTPResponse(status=303, Location="/login")
            answer.delete_cookie(console.cookie_name(), path="/", secure=console.secure())
            return answer

        @app.get("/")
        def overview():
            now = console.clock()
            days = console.overview(now)
            today = days[-1]
            cards = [("消息", today["messages"]), ("读者", today["people"]),
                     ("已回答", today["answered"]), ("失败", today["failed"]),
                     ("首条回复（中位）", seconds_text(today["first_median"])),
                     ("首条回复（95%）", seconds_text(today["first_p95"])),
                     ("客服消息 / 被动回复", f"{today['service']} / {today['passive']}"),
                     ("用到文章", articles_text(today))]
            return console.render("overview", "概览", bottle.request.environ["csrf"],
                                  days=days[::-1], cards=cards, chart=day_chart(days),
                                  articles_text=articles_text)

        @app.get("/people")
        def people():
            return console.render("people", "对话", bottle.request.environ["csrf"],
                                  people=console.people())

        @app.get("/people/<openid>")
        def conversation(openid):
            before = bottle.request.query.get("before", "")
            now = console.clock()
            turns, older = console.conversation(
                openid, int(before) if before.isdigit() and len(before) < 19 else 2 ** 63 - 1)
            return console.render("conversation", "对话", bottle.request.environ["csrf"],
                                  openid=openid, turns=turns, older=older,
                                  window=console.handoff.window(openid, now),
                                  handed_until=console.handoff.until(openid, now),
                                  hours=f"{console.settings.handoff_hours:g}",
                                  draft=console.field(), once=secrets.token_hex(8))

        @app.post("/people/<openid>/answer")
        def answer(openid):
            text = (bottle.request.forms.getunicode("text") or "").strip()
            here = f"/people/{urllib.parse.quote(openid)}"
            if len(text) > 10000:
                return console.after_post(here, "太长了：一次最多 10000 字。", True, text[:10000])
            once = (bottle.request.forms.get("once") or "")[:32]
            try:
                sent = console.handoff.answer(console.wechat, openid, text, console.clock(),
                                              once=once)
            except OwnerSendError as error:
                if error.partial:  # what did not go is in the box, to send again
                    return console.after_post(here + "#answer", f"{error}。" + (
                        "" if not error.rest else "没发出的部分在下面，等读者再发消息后可以再发。"
                        if error.later else "没发出的部分在下面，可以再发。"), True, error.rest)
                return console.after_post(here + "#answer", f"没有发出：{error}", True, text)
            return console.after_post(here + "#answer", f"已发出 {sent} 条。机器人暂停回答这位读者 "
                                      f"{console.settings.handoff_hours:g} 小时，或到你按“交还机器人”。")

        @app.post("/people/<openid>/give-back")
        def give_back(openid):
            console.handoff.give_back(openid)
            log.info("%s given back to the bot from the console", short_id(openid))
            return console.after_post(f"/people/{urllib.parse.quote(openid)}",
                                      "已交还机器人：读者的下一条消息由机器人回答。")

        @app.get("/questions")
        def questions():
            recent, most = console.questions()
            gaps = [("uncovered", "没有文章覆盖", "最近 7 天找不到公众号文章段落的问题（寒暄不算），"
                     "最新的在前。", console.uncovered(), "没有：每个问题都找到了文章。"),
                    ("missed", "段落可能不对", "最近 7 天找到了文章段落、回答却一段也没有引用的问题："
                     "搜索可能找错了段落，或者文章里没有答案。", console.uncovered(missed=True),
                     "没有：找到段落的回答都引用了文章。")] if console.articles else []
            return console.render("questions", "问题", bottle.request.environ["csrf"],
                                  recent=recent, most=most, window=CONSOLE_ASKED, gaps=gaps)

        def note_form() -> tuple[str, str] | None:
            """A note's question and answer as its form sent them; None when either is
            missing or too long, or there are no articles to keep it among."""
            question = " ".join((bottle.request.forms.getunicode("question") or "").split())
            answer = (bottle.request.forms.getunicode("answer") or "").strip()
            if not console.articles or not question or not answer or len(question) > 500 \
                    or len(answer) > 20000:
                return None
            return question, answer

        @app.post("/questions/teach")
        def teach():
            form = note_form()
            if form is None:
                return console.after_post("/questions#uncovered", "问题和答案都要写（问题最多 500 "
                                          "字，答案最多 20000 字）。", True)
            try:
                note = console.teach(*form)
            except LearnError as error:
                return console.after_post("/questions#uncovered", f"没有保存：{error}", True)
            return console.after_post(f"/articles/{note.id}", "已保存。以后有人问到，机器人按这条答案"
                                      f"回答，并注明「{SOURCES_HEAD}{NOTE_SOURCE}」。")

        @app.get("/articles")
        def articles():
            if not console.articles:
                return bottle.HTTPResponse("not found", 404)
            sources, total, passages, synced = console.sources()
            return console.render(
                "articles", "文章", bottle.request.environ["csrf"], sources=sources,
                total=total, passages=passages, synced=synced, url=console.field(),
                kinds=SOURCE_KIND_WORDS)

        @app.get("/articles/<source_id:int>")
        def passages(source_id):
            source, passages = console.passages(source_id) if console.articles and \
                source_id < 2**63 else (None, [])  # SQLite's integers are 64-bit
            if source is None:
                return bottle.HTTPResponse("not found", 404)
            facts = [SOURCE_KIND_WORDS.get(source["kind"], source["kind"]), source["date"],
                     f"学习于 {clock_text(source['learned_at'])}",
                     f"{len(passages)} 段，回答时可能引用"]
            note = source["kind"] == "note"
            return console.render(
                "passages", source["title"], bottle.request.environ["csrf"], source=source,
                passages=passages, facts=[fact for fact in facts if fact],
                note_text=console.note_text(passages) if note else "",
                askers=console.askers(source_id, source["title"]) if note else [])

        @app.post("/articles/<source_id:int>/note")
        def edit_note(source_id):
            form = note_form()
            if form is None:
                return console.after_post(f"/articles/{source_id}", "问题和答案都要写。", True)
            try:
                note = console.teach(*form, source_id)
            except LearnError as error:
                return console.after_post("/articles", f"没有保存：{error}", True)
            return console.after_post(f"/articles/{note.id}", "已保存修改。")

        @app.post("/articles/<source_id:int>/send")
        def send_note(source_id):
            sent, problems = console.send_note(source_id) if console.articles else (0, [])
            line = f"已发给 {sent} 位读者。" + ("没发出的：" + "；".join(problems) if problems
                                          else "")
            return console.after_post(f"/articles/{source_id}", line, bool(problems))

        @app.post("/articles/learn")
        def learn():
            url = (bottle.request.forms.getunicode("url") or "").strip()
            if not console.articles:
                return bottle.HTTPResponse("not found", 404)
            if not re.match(r"https?://[^\s/]", url, re.I) or len(url) > 2000:
                return console.after_post("/articles", f"没有学习 {url[:200]}：请给一个网页地址"
                                          f"（http:// 或 https:// 开头）。", True, url[:2000])
            try:
                line = console.learn(url)
            except LearnError as error:
                return console.after_post("/articles", f"没有学习 {url}：{error}", True, url)
            return console.after_post("/articles", line)

        @app.post("/articles/forget")
        def forget():
            source_id = bottle.request.forms.get("id", "")
            if not source_id.isdigit() or not console.articles or \
                    not console.articles.forget(source_id):
                return console.after_post("/articles", "没有这个来源：它已经删除了。", True)
            log.info("source %s forgotten from the console", source_id)
            return console.after_post("/articles", "已删除这个来源。")

        @app.get("/queue")
        def queue_page():
            return console.render("queue", "队列", bottle.request.environ["csrf"],
                                  states=console.queue(), why=why_text(console.clock()))

        @app.post("/queue/retry")
        def retry():
            message_id = bottle.request.forms.get("id", "")
            if not message_id.isdigit() or len(message_id) > 18:
                return bottle.HTTPResponse("no such message", 400)
            refused = console.retry(int(message_id))
            if refused:
                return console.after_post("/queue", f"消息 #{message_id} {refused}。", True)
            return console.after_post("/queue", f"消息 #{message_id} 已重新排队：马上重新回答。")

        @app.get("/settings")
        def settings_page():
            return console.render("settings", "设置", bottle.request.environ["csrf"],
                                  settings=console.settings_shown(), files=console.files())

        @app.error(404)
        @app.error(405)
        def not_here(error):
            bottle.response.content_type = "text/plain; charset=utf-8"
            return "not found" if error.status_code == 404 else "method not allowed"

        def with_headers(environ, start_response):
            def start(status, headers, exc_info=None):
                own = {name.lower() for name, _ in headers}  # the stylesheet's Cache-Control
                return start_response(status, headers + [
                    header for header in CONSOLE_HEADERS if header[0].lower() not in own],
                                      exc_info)
            return app(environ, start)
        return with_headers

    def secure(self) -> bool:
        """Whether this request came over HTTPS (its cookie is then Secure)."""
        return over_https(bottle.request.environ, self.settings.trusted_proxies)

    def cookie_name(self) -> str:
        name = CONSOLE_COOKIE.format(port=self.settings.admin_port)
        return f"__Host-{name}" if self.secure() else name

    @staticmethod
    def cross_site() -> bool:
        """Whether a page of another site sent this request, as the browser says: by
        Sec-Fetch-Site, or else by an Origin naming another host ("null", which the console's
        own pages send under no-referrer, is no sign either way)."""
        fetched_from = bottle.request.headers.get("Sec-Fetch-Site")
        if fetched_from is not None:
            return fetched_from not in ("same-origin", "none")
        origin = bottle.request.headers.get("Origin", "null")
        return origin != "null" and host_name(origin) != host_name(
            "//" + bottle.request.headers.get("Host", ""))

    def door(self, callback):
        """A bottle plugin: no page or action without a session, no POST without its token."""
        @functools.wraps(callback)
        def guarded(*args, **kwargs):
            if not own_host(bottle.request.environ, self.settings.trusted_proxies):
                return bottle.HTTPResponse(NOT_OWN_HOST, 421)
            if bottle.request.route.config.get("open"):
                return callback(*args, **kwargs)
            token = self.guard.session(bottle.request.get_cookie(self.cookie_name()),
                                       self.clock())
            if token is None:
                if bottle.request.method == "GET":
                    return bottle.HTTPResponse(status=303, Location="/login")
                return bottle.HTTPResponse("log in first", 403)
            if bottle.request.method == "POST" and not hmac.compare_digest(
                    (bottle.request.forms.get("csrf") or "").encode("utf-8", "replace"),
                    token.encode()):
                log_web.warning("console: a form without its session's token refused (%s %s)",
                                bottle.request.method, bottle.request.path)
                return bottle.HTTPResponse("the form is stale: reload the page", 403)
            bottle.request.environ["csrf"] = token
            return callback(*args, **kwargs)
        return guarded


def clock_text(at: float) -> str:
    """A moment as the console shows it: month, day and local time (12月7日 14:05)."""
    moment = time.localtime(at)
    return f"{moment.tm_mon}月{moment.tm_mday}日 {moment.tm_hour:02d}:{moment.tm_min:02d}"


def seconds_text(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.1f} 秒"


def state_text(row) -> str:
    """A message's state in the owner's words: an answer WeChat refused is 未送达."""
    if row["state"] == State.DONE.value and "error" in row.keys() and row["error"]:
        return STATE_WORDS[State.DEAD]
    return STATE_WORDS[State(row["state"])]


#: Each kind of learned source in the owner's words.
SOURCE_KIND_WORDS = {"published": "已发布文章", "url": "网页", "file": "文件", "note": NOTE_SOURCE}
#: A text longer than this shows its beginning, the rest folded away.
FOLD_CHARS = 300
#: The links an answer may hold, as they read once escaped: <a href="https://...">text</a>.
ESCAPED_LINK = re.compile(r"&lt;a href=&quot;((?:https?|weixin)://(?:(?!&quot;)[^\s<>])+)&quot;"
                          r"(?: (?:(?!&gt;)[^<>])*)?&gt;((?:(?!&lt;)[^<>]){1,300}?)&lt;/a&gt;")


def shown_html(text: str) -> str:
    """A stored text as the console shows it: escaped, the links of the 来源 line (and of
    any answer) as links, 继续's tap as its word; a long one folded after FOLD_CHARS."""
    def linked(part: str) -> str:
        return ESCAPED_LINK.sub(lambda match: match.group(2) if match.group(1).startswith(
            "weixin") else f'<a href="{match.group(1)}" rel="noreferrer">{match.group(2)}</a>',
            html.escape(part))
    text = text or ""
    if len(text) <= FOLD_CHARS:
        return linked(text)
    cut = text.rfind("\n", FOLD_CHARS // 2, FOLD_CHARS)
    cut = cut if cut > 0 else FOLD_CHARS
    # A link cut in two would show as markup: the cut moves before it.
    opened = text.rfind("<a ", 0, cut)
    if opened > text.rfind("</a>", 0, cut):
        cut = opened or cut
    return (f'{linked(text[:cut])}<details class="long"><summary>展开全文（共 {len(text)} 字）'
            f'</summary>{linked(text[cut:])}</details>')


def said_text(row) -> str:
    """What a reader sent, as text: their words, or what kind of message it was."""
    if row["content"]:
        return row["content"]
    return f"({row['event'] or row['msg_type']})" if row["msg_type"] == "event" or \
        row["event"] else f"({row['msg_type']})"


def articles_text(day: dict) -> str:
    return f"{day['given']} / {day['cited']}"


def why_text(now: float) -> Callable[[sqlite3.Row], str]:
    """queue_reason at `now`, for a template."""
    return lambda row: queue_reason(row, now)


def day_chart(days: list[dict]) -> dict:
    """Bars for the Overview's SVG: a day's messages, the answered part in front."""
    width, height, base, bar = 330, 130, 112, 16
    top = max([day["messages"] for day in days] + [1])
    bars = []
    for number, day in enumerate(days):
        tall = round(day["messages"] / top * (base - 14), 1)
        answered = round(day["answered"] / top * (base - 14), 1)
        bars.append({"x": 4 + number * 21.6, "y": base - tall, "h": tall,
                     "ay": base - answered, "ah": answered, "day": day["day"],
                     "label": day["day"][8:], "messages": day["messages"],
                     "answered": day["answered"]})
    return {"width": width, "height": height, "base": base, "bar": bar, "top": top,
            "bars": bars}


###############################################################################
# Lifecycle and main ##########################################################
###############################################################################

def give_back_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): what compiling
    this file at start and learning a large page in the server left behind, freed but
    still counted in the process's RSS. Elsewhere (musl): nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(ImportError, OSError, AttributeError):
            import ctypes  # here: a Python built without it still runs wxbot
            ctypes.CDLL(None).malloc_trim(0)


class Janitor:
    """Keeps the database bounded on disk, WAL included: deletes what WXBOT_RETENTION_DAYS no
    longer keeps, at start and every hour, in small batches off the webhook's path, then
    empties the WAL."""

    #: Retention is counted in days, so an hour late costs a twenty-fourth of a day's rows
    #: at most; a pass that finds nothing old costs one indexed read. A retention shorter
    #: than a day (a soak test's) is swept a 24th of it apart.
    EVERY = 3600.0
    #: Messages looked at in one transaction (with their segments, turns and model calls).
    BATCH = 500
    #: Between batches: the webhook and the workers get the write lock in between.
    PAUSE = 0.05

    def __init__(self, settings: Settings, store: Store, articles: Articles | None = None):
        self.settings, self.store, self.articles = settings, store, articles
        self.stopping = threading.Event()

    def sweep(self, now: float | None = None) -> None:
        """Delete everything that is past retention now, batch by batch, and say what went."""
        if not self.settings.retention_days:
            return
        if self.articles:
            self.articles.forget_uses((time.time() if now is None else now) -
                                      self.settings.retention_days * 86400.0)
        before = sum(database_bytes(self.store.path))
        removed: collections.Counter = collections.Counter()
        after: int | None = 0
        while after is not None and not self.stopping.is_set():
            after = self.store.prune(time.time() if now is None else now,
                                     self.settings.retention_days * 86400.0,
                                     self.settings.session_ttl, after, self.BATCH, removed)
            self.stopping.wait(self.PAUSE)
        if self.stopping.is_set():  # the stop closes the database: the next start goes on
            return
        # A WAL left over a limit (a reader held it at the last pass) is emptied even when
        # nothing was old this time.
        if +removed or database_bytes(self.store.path)[1] > WAL_LIMIT:
            main, wal = self.store.checkpoint()
        if not +removed:
            return
        log.info("retention (%g days): removed %d messages with their answers, %d turns of "
                 "history, %d expired keys; the database takes %s on disk, was %s (file %s, "
                 "WAL %s)", self.settings.retention_days, removed["messages"],
                 removed["turns"], removed["keys"], megabytes(main + wal), megabytes(before),
                 megabytes(main), megabytes(wal))

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sweep()
            except sqlite3.Error as error:
                log.error("deleting old messages failed: %s; trying again in an hour", error)
            give_back_memory()
            self.stopping.wait(min(self.EVERY, self.settings.retention_days * 86400 / 24)
                               if self.settings.retention_days else self.EVERY)


#: What a PUBLISHJOBFINISH's publish_status other than 0 (published) means (WECHAT.md §9).
PUBLISH_STATUS = {"1": "still publishing", "2": "the 原创 check failed", "3": "publishing failed",
                  "4": "rejected by review", "5": "deleted by the owner", "6": "banned"}


def published_items(article_id: str, content: dict, fallback_time: float = 0
                    ) -> Iterator[tuple[str, str, str, str, str, dict]]:
    """(origin, title, text, url, date, its card's summary and cover) of each article of a
    published post that is not deleted: the first is known by the post's article_id, the
    next by article_id/2, /3..."""
    created = content.get("create_time") or content.get("update_time") or fallback_time
    date = china_date(float(created)) if created else ""
    for number, item in enumerate(content.get("news_item") or [], 1):
        if not isinstance(item, dict) or item.get("is_deleted"):
            continue
        _, text, _ = page_text(str(item.get("content") or ""), "")
        digest = " ".join(str(item.get("digest") or "").split())
        if digest and digest not in text:
            text = f"{digest}\n{text}"
        origin = article_id if number == 1 else f"{article_id}/{number}"
        yield origin, str(item.get("title") or ""), text, str(item.get("url") or ""), date, \
            {"summary": digest, "cover": str(item.get("thumb_url") or "")}


def published_error(error: WeChatError, settings: Settings) -> str:
    """Why `learn --published` failed, in one sentence that says what to do."""
    if error.errcode == 48001:
        return ("WeChat does not let this account list its published articles (48001: the "
                "account is not verified, or lacks the permission): learn them by URL instead, "
                "python wxbot.py learn https://mp.weixin.qq.com/s/...")
    if error.errcode == 45009:
        return ("WeChat's daily limit of calls to the published-articles API is reached "
                "(45009): what was learned so far is kept; run learn --published again tomorrow")
    if error.errcode is None:
        return unreachable_wechat(settings, error)
    return f"WeChat refused to list the published articles: {error.hint()}"


def unreachable_wechat(settings: Settings, error: "WeChatError") -> str:
    """What a command says when WeChat's API could not be reached at all, and what to do."""
    return (f"cannot reach WeChat at {masked_url(settings.api_base)}: {error.errmsg}; this "
            f"server must reach {urllib.parse.urlsplit(settings.api_base).hostname} over "
            f"HTTPS: check its DNS (getent hosts NAME) and that the firewall lets it out")


@dataclasses.dataclass
class SyncReport:
    """What one sync of the published articles did."""

    learned: int = 0      # new or changed
    unchanged: int = 0
    forgotten: int = 0    # deleted by the owner since the last sync
    empty: int = 0        # no text to learn (a post of pictures only)


class ArticleSync:
    """Keeps the published articles learned: each new one as WeChat announces it
    (PUBLISHJOBFINISH), and the whole list once a day (new, changed and deleted ones).

    Only once the owner has run `learn --published` (Articles.last_sync), and while
    WXBOT_LEARN_PUBLISHED is on. The webhook hands the push over (pushed()); this thread
    fetches the article, so the ack never waits for WeChat's API.
    """

    EVERY = 86400.0
    #: After a failed sync (45009, WeChat unreachable): the next try.
    RETRY = 3600.0
    #: batchget's most per call.
    PAGE = 20

    def __init__(self, settings: Settings, articles: Articles, wechat: WeChatAPI):
        self.settings, self.articles, self.wechat = settings, articles, wechat
        self.stopping = threading.Event()
        self._jobs: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._retry_at = 0.0

    def pushed(self, fields: dict[str, str]) -> None:
        """A PUBLISHJOBFINISH push: taken in at once, fetched by run()."""
        self._jobs.put(fields)

    def stop(self) -> None:
        self.stopping.set()
        self._jobs.put(None)

    def sync(self, now: float | None = None) -> SyncReport:
        """Learn every published article that is new or changed, forget the deleted ones.
        WeChatError when WeChat refuses (48001, 45009...): what was learned is kept, the
        deleted ones are forgotten only after the whole list was read."""
        now = time.time() if now is None else now
        report, known, listed, offset = SyncReport(), self.articles.digests("published"), set(), 0
        while True:
            page = self.wechat.published(offset, self.PAGE)
            posts = page.get("item") or []
            for post in posts:
                article_id = str(post.get("article_id") or "")
                if not article_id:
                    continue
                for origin, title, text, url, date, card in published_items(
                        article_id, post.get("content") or {}, post.get("update_time") or 0):
                    listed.add(origin)
                    if known.get(origin) == article_digest(
                            " ".join(title.split()) or origin, text, url, date):
                        report.unchanged += 1
                        continue
                    try:
                        self.articles.learn_text("published", origin, title, text, url, date,
                                                 now=now, **card)
                        report.learned += 1
                    except LearnError:
                        report.empty += 1
            offset += len(posts)
            if self.stopping.is_set():  # the server stops: the rest waits for the next sync
                return report
            if not posts or offset >= int(page.get("total_count") or 0):
                break
        for origin in known.keys() - listed:
            report.forgotten += self.articles.forget(origin, published=True)
        self.articles.note_sync(now)
        return report

    def learn_post(self, article_id: str) -> int:
        """Learn one published post's articles (getarticle); how many were learned."""
        answer = self.wechat.published_article(article_id)
        learned = 0
        for origin, title, text, url, date, card in published_items(article_id, answer,
                                                                   time.time()):
            with contextlib.suppress(LearnError):
                self.articles.learn_text("published", origin, title, text, url, date, **card)
                learned += 1
        return learned

    def announced(self, fields: dict) -> None:
        """What a PUBLISHJOBFINISH asks: learn the post, forget it, or only say what befell it."""
        status, article_id = fields.get("publish_status", ""), fields.get("article_id", "")
        if self.articles.last_sync() is None:
            log.info("an article was published; it is not learned, as `python wxbot.py learn "
                     "--published` never ran (run it once to keep articles in sync)")
        elif status == "5" and article_id:
            self.articles.forget(article_id, published=True)
            log.info("published post %s was deleted by the owner: forgotten", article_id)
        elif status != "0" or not article_id:
            log.info("a publish job ended without an article (publish_status %s: %s)",
                     status or "?", PUBLISH_STATUS.get(status, "unknown"))
        else:
            try:
                learned = self.learn_post(article_id)
                log.info("learned %d article(s) of the post %s just published", learned,
                         article_id)
            except WeChatError as error:
                log.error("the post %s just published was not learned: %s; the daily sync "
                          "tries again", article_id, error.hint())

    def run(self) -> None:
        while not self.stopping.is_set():
            last = self.articles.last_sync()
            due = max((last or 0) + self.EVERY, self._retry_at)
            if last is not None and time.time() >= due:
                try:
                    report = self.sync()
                    log.info("published articles synced: %d learned, %d unchanged, %d "
                             "forgotten", report.learned, report.unchanged, report.forgotten)
                except Exception as error:  # one odd answer never ends this thread
                    # The account's permission or its daily limit: tomorrow; else an hour.
                    later = self.EVERY if getattr(error, "errcode", None) in (48001, 45009) \
                        else self.RETRY
                    self._retry_at = time.time() + later
                    log.error("syncing the published articles failed: %s; trying again in "
                              "%s", self.why_failed(error), age_text(later))
                continue
            wait = min(3600.0, due - time.time()) if last is not None else 3600.0
            try:
                fields = self._jobs.get(timeout=max(1.0, wait))
            except queue.Empty:
                continue
            if fields is not None:
                try:
                    self.announced(fields)
                except Exception as error:  # as above
                    log.error("a published article was not learned: %s; the daily sync tries "
                              "again", self.why_failed(error))

    def why_failed(self, error: Exception) -> str:
        """A sync's failure for the log. An answer of WeChat's shaped otherwise than documented
        (a field of another type) must not end the thread that keeps the articles in sync."""
        if isinstance(error, WeChatError):
            return published_error(error, self.settings)
        if isinstance(error, (sqlite3.Error, LearnError)):
            return str(error)
        return f"WeChat's answer was not as documented ({type(error).__name__}: {error})"


class Bot:
    """Everything wired together: store, webhook, server, acknowledger, workers, senders."""

    def __init__(self, settings: Settings, owner: OwnerFiles | None = None):
        self.settings = settings
        SECRET_FILTER.add_settings(settings)
        self.owner = owner or OwnerFiles(settings)
        self.store = Store(settings.db)
        self.wakeup = Wakeup()
        self.ready = Wakeup()  # the senders'
        self.wechat = WeChatAPI(settings, self.store)
        self.model = Model(settings)
        self.mode = DeliveryMode(settings.mode, self.store)
        self.acknowledger = Acknowledger(settings, self.store, self.wechat, self.mode)
        self.articles = Articles(settings.db, turn=self.store.write_turn,
                                 private=settings.learn_private)
        self.articles.meaning = Meaning(settings) if settings.embed_model else None
        self._meaning_stop = threading.Event()
        self.notifier = Notifier(settings, self.store)
        self.store.on_disk_full = lambda: self.notifier.tell(
            "disk", f"数据库所在的磁盘满了（{settings.db}）：新消息暂时收不下，请清理空间（df -h）。")
        self.handoff = Handoff(settings, self.store, self.notifier)
        self.article_sync = (ArticleSync(settings, self.articles, self.wechat)
                             if settings.learn_published else None)
        self.webhook = Webhook(settings, self.store, self.wakeup, self.mode, wechat=self.wechat,
                               acknowledger=self.acknowledger, owner=self.owner,
                               ready=self.ready, publishing=self.article_sync,
                               handoff=self.handoff)
        self.server = HttpServer(make_app(settings, self.store, self.webhook),
                                 settings.host, settings.port, settings.trusted_proxies)
        #: Questions held while the model fails for everyone (WXBOT_HOLD=0: none is), and
        #: the owner told of it.
        self.outage = Outage(settings, self.store, self.notifier)
        self.workers = [Worker(settings, self.store, self.wechat, self.model, self.wakeup,
                               self.mode, f"worker-{n}", self.owner, self.acknowledger,
                               self.ready, self.articles, self.handoff, self.notifier,
                               outage=self.outage)
                        for n in range(settings.workers)]
        self.senders = [Sender(settings, self.store, self.wechat, self.model, self.ready,
                               self.mode, f"sender-{n}", self.owner, others=self.wakeup,
                               articles=self.articles,  # /stats
                               handoff=self.handoff, notifier=self.notifier)
                        for n in range(Sender.THREADS)]
        self.janitor = Janitor(settings, self.store, self.articles)
        self.metrics = Metrics(self.store, self.outage)
        for counted in [self.webhook, self.model, *self.workers, *self.senders]:
            counted.metrics = self.metrics
        #: The owner's console; None without WXBOT_ADMIN_PASSWORD.
        self.owner_console = OwnerConsole(
            settings, self.store, self.owner, self.wakeup, self.articles, handoff=self.handoff,
            wechat=self.wechat) if settings.admin_password else None
        #: The admin listener: /metrics, and the console when there is one; never the
        #: webhook's port. Without a console, a port taken (a second wxbot left at the
        #: default) costs the metrics only.
        try:
            self.console: HttpServer | None = HttpServer(self.metrics.wsgi(
                self.owner_console and self.owner_console.app(), settings.trusted_proxies),
                settings.admin_host, settings.admin_port, settings.trusted_proxies,
                "WXBOT_ADMIN_PORT")
        except CannotListen as error:
            # The webhook's own port: a mistake in the settings, not a second wxbot.
            if self.owner_console or settings.admin_port == self.port:
                self.server.server.server_close()
                raise
            log.warning("no /metrics: %s", error)
            self.console = None
        self.threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        give_back_memory()
        recovered = self.store.release_all_leases()
        if recovered:
            log.info("resuming %d message(s) that were in progress at the last stop", recovered)
        if not self.mode.passive:  # those still within WeChat's typing window see it now
            for row in self.store.awaiting_answer(time.time() - Acknowledger.TYPING_WINDOW):
                self.acknowledger.pushed(row["id"], row["openid"], row["received_at"])
        self.acknowledger.start()
        self.server.start()
        if self.console:
            self.console.start()
            log.info("metrics on http://%s:%d/metrics", self.settings.admin_host,
                     self.console.port)
            if not self.owner_console and not local_address(self.settings.admin_host):
                log.warning("/metrics listens on %s, beyond this machine: anyone who reaches "
                            "the port reads the bot's counts; keep WXBOT_ADMIN_HOST=127.0.0.1 "
                            "and scrape through ssh -L or nginx (README, Console)",
                            self.settings.admin_host)
        if self.owner_console:
            threading.Thread(target=self.owner_console.count_days, name="console-days",
                             daemon=True).start()
            log.info("owner's console on http://%s:%d/", self.settings.admin_host,
                     self.console.port)
            if not local_address(self.settings.admin_host):
                log.warning("the console listens on %s, beyond this machine: without HTTPS "
                            "its password crosses the network in clear; keep "
                            "WXBOT_ADMIN_HOST=127.0.0.1 and use ssh -L or nginx with HTTPS "
                            "(README, Console)", self.settings.admin_host)
        for worker in self.workers + self.senders:
            thread = threading.Thread(target=worker.run, name=worker.name, daemon=True)
            thread.start()
            self.threads.append(thread)
        threading.Thread(target=self.janitor.run, name="janitor", daemon=True).start()
        if self.settings.notify_url:
            threading.Thread(target=self.notifier.run, name="notifier", daemon=True).start()
        if self.article_sync:
            thread = threading.Thread(target=self.article_sync.run, name="articles", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.articles.meaning:
            threading.Thread(target=self.articles.meaning.run, name="meaning", daemon=True,
                             args=(self.articles, self._meaning_stop)).start()
        log.info("listening on http://%s:%d%s with %d workers, answers by %s", self.settings.host,
                 self.port, self.settings.path, len(self.workers),
                 "passive reply" if self.mode.passive else "customer-service API")

    def stop(self, timeout: float | None = None) -> bool:
        """Stop taking pushes, let answers in flight finish; True when all finished in time."""
        timeout = self.settings.stop_timeout if timeout is None else timeout
        self.webhook.accepting = False
        self.server.stop()
        if self.console:
            self.console.stop()
        self.acknowledger.stop()
        for worker in self.workers + self.senders:
            worker.stop()
        self.janitor.stopping.set()
        self.notifier.stop()
        if self.article_sync:
            self.article_sync.stop()
        self._meaning_stop.set()
        self.wakeup.notify_all()
        self.ready.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        finished = not any(thread.is_alive() for thread in self.threads)
        if not finished:
            log.warning("stop timeout reached; unfinished answers resume at the next start")
        self.store.release_all_leases()
        self.store.close()
        self.articles.close()
        return finished


class Signals:
    """SIGTERM, SIGINT and SIGHUP as bytes on a socket that the main thread reads.

    The kernel gives a signal sent to the process to any of its threads, and Python runs its
    handlers in the main thread only, once that thread runs Python code again: a main thread
    asleep in a wait stayed asleep when a worker's thread took the SIGTERM, and the stop
    never began. The wakeup socket is written by the C-level handler whichever thread takes
    the signal, and a read on it wakes at once.
    """

    #: Written when the stop is done; no signal has the number 0.
    STOPPED = 0

    def __init__(self):
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)  # the C handler must never block
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: None)  # the byte says which

    def serve(self, bot: "Bot") -> None:
        """Until SIGTERM or SIGINT (SIGHUP, systemctl reload: the owner's files are read
        again); then the stop, during which a second signal exits at once."""
        while (signum := self._read.recv(1)[0]) not in (signal.SIGTERM, signal.SIGINT):
            if signum == signal.SIGHUP:
                bot.owner.stale()
        log.info("stopping: no new pushes; finishing answers in flight (up to %.0f s)",
                 bot.settings.stop_timeout)

        def stop() -> None:
            try:
                bot.stop()
            finally:
                self._write.send(bytes([self.STOPPED]))
        threading.Thread(target=stop, name="stop", daemon=True).start()
        while (signum := self._read.recv(1)[0]) != self.STOPPED:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.warning("second signal: exiting now")
                os._exit(1)
        signal.set_wakeup_fd(-1)
        log.info("stopped")


class Console:
    """Stands in for WeChat in `chat`: prints each segment as WeChat would show it."""

    #: A link as WeChat shows it: its text, underlined. Linear: no part runs past a "<".
    LINK = re.compile(r"<a\s[^<>]*>([^<]*)</a>")
    HREF = re.compile(r'\bhref="([^"]*)"')

    def __init__(self, out):
        self.out = out

    def customer_service_send(self, openid: str, text: str) -> None:
        print(f"\n{self.LINK.sub(self._link, text)}\n{'─' * 20}", file=self.out, flush=True)

    def send_card(self, openid: str, card: dict) -> None:
        """A card as a line: the article's title and address (a published one's id)."""
        news = (card.get("news") or {}).get("articles") or [{}]
        shown = f"《{news[0].get('title', '')}》 ({news[0].get('url', '')})" if "news" in card \
            else f"文章 {card['mpnewsarticle']['article_id']}"
        self.customer_service_send(openid, f"[文章卡片] {shown}")

    def _link(self, match: re.Match) -> str:
        """A link's text, then where a tap on it goes; a tap that sends a word (继续) is
        the word typed here."""
        href = self.HREF.search(match.group())
        url = href.group(1) if href else ""
        return f"{match.group(1)} ({url})" if url.startswith(("http://", "https://")) \
            else match.group(1)

    def first_time(self, errcode: int) -> bool:
        return True


#: What `chat` shows when it waits for the next message.
CHAT_PROMPT = "你> "


def chat(settings: Settings, lines, out, owner: OwnerFiles | None = None) -> int:
    """A console conversation with the real model, through wxbot's own worker."""
    root, ext = os.path.splitext(settings.db)
    # The articles the server learned, where it has a database: answers cite them as in WeChat.
    articles = Articles(settings.db) if os.path.exists(settings.db) else None
    # No drawing here: the console shows no pictures.
    settings = dataclasses.replace(settings, db=f"{root}-chat{ext or '.db'}", user_rate=0,
                                   user_daily=0, image_model="")
    try:
        store = Store(settings.db)
    except DatabaseUnusable as error:
        print(f"wxbot: {error}", file=sys.stderr)
        return 2
    worker = Worker(settings, store, Console(out), Model(settings), Wakeup(),
                    DeliveryMode("service", store), "chat", owner, articles=articles)
    print(f"wxbot chat with {settings.model} (history in {settings.db}; /reset forgets it, "
          f"Ctrl-D ends)", file=out, flush=True)
    lines = iter(lines)
    while True:
        print(CHAT_PROMPT, end="", file=out, flush=True)
        line = next(lines, None)
        if line is None:
            print(file=out)  # the shell's prompt on a line of its own
            break
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
    if articles:
        articles.close()
    return 0


def age_text(seconds: float) -> str:
    """A duration as an operator reads it at a glance: 45s, 12m, 3h 05m, 2d 4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def queue_reason(row: sqlite3.Row, now: float) -> str:
    """Why a message of the queue is where it is (`status`, the console's Queue page)."""
    if row["state"] == State.LEASED.value:
        note = f"lease ends in {age_text(row['lease_until'] - now)}"
    elif row["state"] == State.QUEUED.value and row["not_before"] > now:
        note = f"next try in {age_text(row['not_before'] - now)}"
    else:
        note = ""
    failures = (f"failures: model {row['model_failures']}, delivery "
                f"{row['delivery_failures']}, interrupted {row['interruptions']}"
                if row["model_failures"] + row["delivery_failures"] +
                row["interruptions"] else "")
    return "; ".join(part for part in (note, failures, row["error"] or "") if part)


#: `status` lists at most this many messages of each state, oldest first.
STATUS_ROWS = 20


def open_for_operator(settings: Settings, out, command: str = "status",
                      any_schema: bool = False) -> sqlite3.Connection | None:
    """The database of a service that may be running: no migration, readers never block it;
    of this wxbot's schema unless `any_schema`. `command` changes it (retry): this user must
    be allowed to write it."""
    changes = command == "retry"
    problem = access_problem(settings.db, write=changes)
    if problem:
        reason, owner, _ = problem
        print(f"cannot {'change' if changes else 'read'} the database "
              f"{settings.db}: {reason}" + (
                  f": run this as {owner}, e.g. sudo -u {owner} .venv/bin/python wxbot.py "
                  f"{command} ..." if owner else " (check WXBOT_DB, or --env FILE)"), file=out)
        return None
    if not os.path.exists(settings.db):
        print(f"no database at {settings.db} (check WXBOT_DB, or --env FILE)", file=out)
        return None
    try:
        conn = sqlite3.connect(settings.db, timeout=15, isolation_level=None)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as error:  # most often: the file is the service user's, mode 600
        print(f"cannot open the database {settings.db} ({error}): run this as the service's "
              f"user, e.g. sudo -u wxbot .venv/bin/python wxbot.py {command} ...", file=out)
        return None
    conn.row_factory = sqlite3.Row
    if version != SCHEMA_VERSION and not any_schema:
        print(f"{settings.db} has schema {version}, this wxbot reads {SCHEMA_VERSION}: start "
              f"this wxbot once to bring it up to date", file=out)
        conn.close()
        return None
    return conn


def never_served(path: str) -> bool:
    """Whether the database holds no queue at all: only what `learn` keeps (the articles)."""
    try:
        with contextlib.closing(sqlite3.connect(
                f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True,
                timeout=1)) as conn:
            names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
            return conn.execute("PRAGMA user_version").fetchone()[0] == 0 and \
                "messages" not in names and "article_passages" in names
    except sqlite3.Error:
        return False  # open_for_operator says why


def status(settings: Settings, out, now: float | None = None) -> int:
    """The queue from the database: waiting, in progress and dead messages, oldest first."""
    now = time.time() if now is None else now
    if os.path.isfile(settings.db) and never_served(settings.db):
        print(f"queue in {settings.db}: empty; wxbot has not served from this database yet "
              f"(`learn` keeps the articles there)", file=out)
        return 0
    conn = open_for_operator(settings, out)
    if conn is None:
        return 1
    with contextlib.closing(conn):
        main, wal = database_bytes(settings.db)
        print(f"queue in {settings.db} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              f"on disk: {megabytes(main + wal)} (file {megabytes(main)}, WAL "
              f"{megabytes(wal)})", file=out)
        for state, title in ((State.QUEUED, "waiting"), (State.LEASED, "in progress"),
                             (State.DEAD, "dead")):
            total = conn.execute("SELECT messages FROM state_counts WHERE state = ?",
                                 (state.value,)).fetchone()[0]
            print(f"\n{title}: {total}", file=out)
            for row in conn.execute(
                    "SELECT id, openid, msg_type, event, received_at, not_before, lease_until,"
                    " state, error, model_failures, delivery_failures, interruptions FROM"
                    " messages WHERE state = ? ORDER BY id LIMIT ?", (state.value, STATUS_ROWS)):
                reason = queue_reason(row, now)
                print(f"  #{row['id']:<6} {age_text(now - row['received_at']):>7} old  "
                      f"{short_id(row['openid']):<10} {row['event'] or row['msg_type']:<10}"
                      f" {reason}".rstrip(), file=out)
            if total > STATUS_ROWS:
                print(f"  ... and {total - STATUS_ROWS} more", file=out)
        if conn.execute("SELECT 1 FROM messages WHERE state = 'dead' LIMIT 1").fetchone():
            print("\nto try a dead message again: python wxbot.py retry ID", file=out)
    return 0


def retry(settings: Settings, message_id: int, out) -> int:
    """Queue a dead message again, its failure counts cleared; the service takes it within
    a minute (Worker.IDLE_LOOK)."""
    conn = open_for_operator(settings, out, "retry")
    if conn is None:
        return 1
    with contextlib.closing(conn):
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        refused = requeue(conn, message_id, time.time())
        conn.execute("COMMIT")
        if refused is not None:
            print(f"message {message_id} " + (f"is {refused}, not dead or failed: nothing to do"
                                              if refused else "is not in the database"),
                  file=out)
            return 1
    print(f"message {message_id} is queued again; the running wxbot takes it within a minute",
          file=out)
    return 0


#: The name `backup FOLDER` gives each copy: sorted by name, oldest first.
BACKUP_NAME = "wxbot-%Y%m%d-%H%M%S.db"
BACKUP_FILES = re.compile(r"wxbot-\d{8}-\d{6}\.db")


def backup(settings: Settings, target: str, out) -> int:
    """A consistent copy of the database while the service runs, readable by its owner only,
    checked before it is given its name. Into a folder (the daily timer), a copy named by
    the time, and only the latest WXBOT_BACKUP_KEEP copies of the folder kept.

    VACUUM INTO reads one snapshot and writes it out whole: writers go on meanwhile (WAL),
    and unlike SQLite's online backup it never starts over when they write.
    """
    folder = target if os.path.isdir(target) else None
    missing = os.path.abspath(target) if target.endswith(("/", os.sep)) else \
        os.path.dirname(os.path.abspath(target))  # backups/ names a folder, even a missing one
    if folder:
        target = os.path.join(folder, time.strftime(BACKUP_NAME))
    elif not os.path.isdir(missing):
        print(f"there is no folder {missing}: create it first (mkdir -p {missing}), or name a "
              f"file in a folder that exists (nothing was written)", file=out)
        return 1
    if os.path.lexists(target):
        print(f"{target} exists: give the backup a new name (nothing was written)",
              file=out)
        return 1
    conn = open_for_operator(settings, out, "backup", any_schema=True)  # before upgrades too
    if conn is None:
        return 1
    partial = f"{target}.partial"
    started = time.monotonic()
    try:
        with contextlib.closing(conn):
            os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            conn.execute("VACUUM INTO ?", (partial,))
        with contextlib.closing(sqlite3.connect(partial)) as copy:
            problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            messages = copy.execute("SELECT count(*) FROM messages").fetchone()[0]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("the copy fails integrity_check: " +
                                        "; ".join(problems[:3]))
        os.replace(partial, target)
    except (OSError, sqlite3.Error) as error:
        with contextlib.suppress(OSError):
            os.remove(partial)
        folder = os.path.dirname(os.path.abspath(target))
        print(f"no backup written: {error} (is there room in {folder}, and may this user "
              f"write there?)", file=out)
        return 1
    print(f"backup of {settings.db} written to {target}: {megabytes(os.path.getsize(target))}, "
          f"{messages} messages, integrity ok, in {time.monotonic() - started:.1f} s", file=out)
    if folder:  # only the copies this command names: nothing else of the folder's
        copies = sorted(name for name in os.listdir(folder) if BACKUP_FILES.fullmatch(name))
        for name in copies[:-settings.backup_keep]:
            os.remove(os.path.join(folder, name))
            print(f"removed the older copy {name} (WXBOT_BACKUP_KEEP={settings.backup_keep})",
                  file=out)
    return 0


#: A 1x1 PNG that `check` uploads to learn whether WeChat takes pictures from this account.
CHECK_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
             "AAAABJRU5ErkJggg==")


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
    except (DatabaseUnusable, sqlite3.Error, OSError, RuntimeError) as error:
        report(False, str(error) if isinstance(error, DatabaseUnusable) else
               f"database {settings.db}: {error} (check WXBOT_DB and the folder's rights)")
        store = Store(":memory:")
    try:
        WeChatAPI(settings, store)._fetch_token(force=False)
        report(True, f"WeChat gave an access token for AppID {settings.appid}")
    except WeChatError as error:
        if error.errcode is None:
            report(False, unreachable_wechat(settings, error))
        elif error.errcode == 40164:
            report(False, f"WeChat saw this server as {error.ip() or 'an IP'} and it "
                          f"is not whitelisted: add it in 公众号后台 → 设置与开发 → 基本配置 → "
                          f"IP白名单, then run check again")
        elif error.errcode in (40013, 40125, 40243, 41004):
            report(False, HINTS.get(error.errcode, "WXBOT_APPSECRET is missing or wrong"))
        else:
            report(False, f"WeChat refused the access token: {error.hint()}")
    try:
        Model(settings).answer([{"role": "user", "content": "ping"}],
                               Deadline(settings.model_timeout), max_tokens=5)
        report(True, f"the model {settings.model} answers")
    except ModelError as error:
        mentions_model = "model" in error.detail.lower()
        if error.status in (401, 403):
            report(False, "the model provider refused OPENAI_API_KEY: copy the key again")
        elif error.status in (400, 404) and mentions_model:
            report(False, f"the provider does not know the model {settings.model!r}: check "
                          f"WXBOT_MODEL against the provider's model list")
        elif error.status == 404:
            report(False, f"no OpenAI-compatible API at "
                          f"{masked_url(settings.openai_base_url) or 'https://api.openai.com/v1'}"
                          f": check "
                          f"OPENAI_BASE_URL (it usually ends in /v1)")
        elif error.kind in ("empty", "refused"):  # it answered, with nothing to show
            report(True, f"the model {settings.model} answers (nothing in 5 tokens: a "
                         f"reasoning model thinks first; leave it room in WXBOT_MAX_TOKENS)")
        elif error.status is None:  # no HTTP answer at all: the error says what to check
            report(False, str(error))
        else:
            report(False, f"the model failed: {error}")
    if settings.embed_model:
        try:
            dimensions = len(Meaning(settings).vectors(["营业时间"], Meaning.LEARN_TIMEOUT)[0])
            report(True, f"the embeddings model {settings.embed_model} answers ({dimensions} "
                         f"dimensions): articles are searched by meaning too")
        except ModelError as error:
            report(False, f"{error}: check WXBOT_EMBED_MODEL, WXBOT_EMBED_BASE_URL and "
                          f"WXBOT_EMBED_API_KEY (DeepSeek has no embeddings: point them at "
                          f"another provider, or unset WXBOT_EMBED_MODEL)")
    if settings.image_model:
        try:  # a 1x1 PNG: temporary media costs nothing and is gone in 3 days
            WeChatAPI(settings, store).upload_image(base64.b64decode(CHECK_PNG))
            report(True, f"WeChat takes pictures (media/upload): 画 draws with "
                         f"{settings.image_model}")
        except WeChatError as error:
            report(False, "drawing will not work: WeChat refuses media/upload (48001: only "
                          "verified accounts, or the 测试号, may upload pictures); verify the "
                          "account or unset WXBOT_IMAGE_MODEL" if error.errcode == 48001
                   else f"drawing: WeChat refused a picture upload: {error.hint()}")
    if settings.notify_url:
        problem = Notifier(settings, store).send("test", "这是一条测试通知：以后读者找人工、消息未送达、"
                                                 "模型持续失败、磁盘满了，都会发到这里。", time.time())
        report(problem is None, "WXBOT_NOTIFY_URL took a test notification" if problem is None
               else f"WXBOT_NOTIFY_URL {masked_url(settings.notify_url)} refused a test "
                    f"notification ({problem}): check the group robot's webhook address")
    store.close()
    for setting, path, *how in OwnerFiles.files(settings):
        if not path:
            continue
        try:
            report(True, f"{setting}: {path} has "
                         f"{OwnerFile(setting, path, *how).value.describe()}")
        except FileProblem as error:
            for problem in error.problems:
                report(False, f"{error.where()}: {problem}")
    print(f"\nIn 公众号后台 → 设置与开发 → 基本配置 → 服务器配置, enter:\n"
          f"  URL:   http://<this server's domain or IP>{settings.path}  (port 80, or 443 "
          f"with https; wxbot listens on {settings.host}:{settings.port})\n"
          f"  Token: {settings.token}\n"
          f"  消息加解密方式: {'兼容模式 or 安全模式' if settings.aes_key else '明文模式'}",
          file=out)
    print("all checks passed" if not failures else f"{failures} check(s) failed", file=out)
    return 0 if not failures else 1


def menu_command(settings: Settings, path: str | None, show: bool, delete: bool, out) -> int:
    """`menu FILE`: check the file, then make it the menu; `--show`, `--delete`."""
    if path is not None:
        try:
            menu = load_menu(path)
        except FileProblem as error:
            for problem in error.problems:
                print(f"{path}: {problem}", file=out)
            print(f"{path}: not sent to WeChat: {len(error.problems)} problem(s)", file=out)
            return 1
    try:
        store = Store(settings.db)  # the access token cache, shared with the running bot
    except DatabaseUnusable as error:
        print(f"wxbot: {error}", file=sys.stderr)
        return 2
    wechat = WeChatAPI(settings, store)
    try:
        if show:
            menu = menu_in_force(wechat.menu_current())
            print(json.dumps(menu, ensure_ascii=False, indent=2) if menu else
                  "no menu is in force", file=out)
        elif delete:
            wechat.menu_delete()
            print("menu deleted (WeChat clients show the change within about 5 minutes, "
                  "or when the user follows the account again)", file=out)
        else:
            wechat.menu_create(menu)
            print(f"menu from {path} is in force ({len(menu['button'])} buttons; WeChat "
                  f"clients show it within about 5 minutes)", file=out)
        return 0
    except WeChatError as error:
        if error.errcode is None:
            print(unreachable_wechat(settings, error), file=out)
        else:
            print(menu_error(error), file=out)
        return 1
    finally:
        store.close()


def learn_command(settings: Settings, sources: list[str], published: bool, listing: bool,
                  forget: bool, out) -> int:
    """`learn`: sources (URLs, files, folders) and --published; --list; --forget SOURCE.
    Safe while the server runs. 1 when anything was not learned (each is named, with why)."""
    if (listing or forget) and not os.path.exists(settings.db):  # nothing to list: none made
        print(f"no database at {settings.db} (check WXBOT_DB, or --env FILE): nothing is "
              f"learned there yet", file=out)
        return 1 if forget else 0
    try:
        articles = Articles(settings.db, private=settings.learn_private)
    except DatabaseUnusable as error:
        print(error, file=out)
        return 1
    except (sqlite3.Error, OSError) as error:  # most often: the service user's file, mode 600
        print(f"cannot open the database {settings.db} ({error}): check WXBOT_DB (or --env "
              f"FILE), and run this as the service's user, e.g. sudo -u wxbot "
              f".venv/bin/python wxbot.py learn ...", file=out)
        return 1
    failures = 0
    try:
        if listing:
            sources_learned = articles.sources()
            for source in sources_learned:
                print(f"{source.title}\n  {source.kind}: {source.origin}\n  "
                      f"{source.passages} passage(s), {source.date or 'no date'}, learned "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(source.learned_at))}",
                      file=out)
            synced = articles.last_sync()
            print(f"{len(sources_learned)} source(s); published articles "
                  + (f"last synced {time.strftime('%Y-%m-%d %H:%M', time.localtime(synced))}"
                     if synced else "never synced (learn --published)"), file=out)
            return 0
        if forget:
            for source in sources:
                if articles.forget(source):
                    print(f"forgot {source}", file=out)
                else:
                    failures += 1
                    print(f"{source}: not learned (learn --list shows what is)", file=out)
            return 1 if failures else 0
        if published:
            store = Store(settings.db)  # the access token cache, shared with the running bot
            try:
                report = ArticleSync(settings, articles, WeChatAPI(settings, store)).sync()
                print(f"published articles: {report.learned} learned, {report.unchanged} "
                      f"unchanged, {report.forgotten} forgotten (deleted since)"
                      + (f", {report.empty} with no text" if report.empty else "")
                      + ("; the server keeps them in sync" if settings.learn_published else
                         "; WXBOT_LEARN_PUBLISHED=0: the server does not keep them in sync"),
                      file=out)
            except WeChatError as error:
                failures += 1
                print(published_error(error, settings), file=out)
            finally:
                store.close()
        not_learned = 0
        for name, outcome in articles.learn_many(sources):
            if isinstance(outcome, LearnError):
                not_learned += 1
                print(f"{name}: not learned: {outcome}", file=out, flush=True)
            else:
                print(f"{name}: unchanged since it was learned, 《{outcome.title}》" if
                      outcome.unchanged else f"{name}: learned 《{outcome.title}》, "
                      f"{outcome.passages} passage(s)", file=out, flush=True)
        if not_learned:
            print(f"{not_learned} source(s) not learned", file=out)
        if settings.embed_model and (sources or published):
            meaning = Meaning(settings)
            computed = meaning.learn(articles)
            print(f"{computed} passage(s) can now be found by meaning ({settings.embed_model})"
                  if not meaning.failure.failing else
                  f"{computed} passage(s) can now be found by meaning; the embeddings API failed"
                  f" (the log says how): the server tries again each minute", file=out)
        return 1 if failures or not_learned else 0
    finally:
        articles.close()


def help_text() -> str:
    lines = ["settings (environment variables, or KEY=VALUE lines in --env FILE;",
             "a relative file name in FILE is read beside FILE):"]
    for setting in SETTINGS.values():
        default = "required" if setting.default is None else f"default {setting.default!r}"
        if setting.default and len(setting.default) > 40:
            default = "default: see README"
        lines.append(f"  {setting.env:<22} {setting.help} ({default})")
    return "\n".join(lines)


#: Commands on a service's database: given its env file, they must find that database.
OPERATOR_COMMANDS = ("status", "retry", "backup", "learn", "menu")


def unnamed_database(env_file: str, beside: str) -> str:
    """Why an operator command given an env file without WXBOT_DB does nothing. A unit sets
    WXBOT_DB for its service (Environment=): without the line in the file, the command would
    make a new, empty database beside the file and report on that one."""
    return (f"wxbot: {env_file} does not name the database (WXBOT_DB) and there is none beside "
            f"it ({beside}): add the service's, e.g. WXBOT_DB=/var/lib/wxbot/wxbot.db (or "
            f"/var/lib/wxbot/NAME/wxbot.db for wxbot@NAME; `systemctl cat` shows the unit's), "
            f"or WXBOT_DB=wxbot.db to begin one beside it; nothing was done")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wxbot.py", description=__doc__.split("\n")[0], epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="serve",
                        choices=["serve", "check", "chat", "menu", "status", "retry",
                                 "backup", "learn"],
                        help="serve (default): run the bot; check: try the settings for real; "
                             "chat: talk to the model in this console; menu FILE.json: make "
                             "the file the account's custom menu; status: the queue, with "
                             "dead messages and why; retry ID: queue a dead message again; "
                             "backup FILE: a checked copy of the database, while it serves; "
                             "learn SOURCE...: learn the account's articles from URLs, .md/"
                             ".txt/.html files and folders (again: replaces them)")
    # menu's and backup's FILE, retry's ID, learn's SOURCEs
    parser.add_argument("file", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--show", action="store_true", help="with menu: print the menu in force")
    parser.add_argument("--delete", action="store_true", help="with menu: remove the menu")
    parser.add_argument("--published", action="store_true",
                        help="with learn: every article published with 发布 (the server then "
                             "keeps them in sync)")
    parser.add_argument("--list", action="store_true", help="with learn: what is learned")
    parser.add_argument("--forget", action="store_true",
                        help="with learn: forget the SOURCEs (URL, path or article_id)")
    parser.add_argument("--env", metavar="FILE", help="read KEY=VALUE settings from FILE")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_intermixed_args(argv)
    sources, args.file = args.file, args.file[0] if len(args.file) == 1 else None
    if args.command == "learn":
        if args.show or args.delete:
            parser.error("--show and --delete go with the menu command")
        if args.list + args.forget + args.published > 1 or (args.list and sources) or not (
                args.list or args.published or sources):
            parser.error("learn takes SOURCEs (URLs, files, folders) and/or --published, or "
                         "--list, or --forget SOURCE")
        if args.forget and not sources:
            parser.error("learn --forget takes the SOURCEs to forget (learn --list shows them)")
    elif args.published or args.list or args.forget:
        parser.error("--published, --list and --forget go with the learn command")
    elif args.command == "menu" and (len(sources) == 1) + args.show + args.delete != 1:
        parser.error("menu takes one of: FILE.json, --show, --delete")
    elif args.command == "retry" and not (len(sources) == 1 and args.file.isdigit()):
        parser.error("retry takes the id of a dead message, as `status` shows it")
    elif args.command == "backup" and len(sources) != 1:
        parser.error("backup takes the file to write the copy to")
    elif args.command not in ("menu", "retry", "backup") and (sources or args.show or
                                                              args.delete):
        parser.error("FILE, --show and --delete go with the menu command")
    # The other commands' output is their report: their log says what went wrong, no more.
    quiet = args.command != "serve" and args.log_level == "INFO"
    logging.basicConfig(level="WARNING" if quiet else args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(SECRET_FILTER)
    # openai 3 brings its own copies of httpx and httpcore, logging under these names.
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    env = dict(os.environ if environ is None else environ)
    try:
        if args.env:  # its values win, but an empty one (KEY=) leaves the environment's
            env.update((key, value) for key, value in read_env_file(args.env).items()
                       if value or key not in env)
            # The database lives with its settings, wherever wxbot is started from.
            named = SETTINGS["db"].env in env
            env.setdefault(SETTINGS["db"].env, os.path.join(
                os.path.dirname(os.path.abspath(args.env)), SETTINGS["db"].default))
            if not named and args.command in OPERATOR_COMMANDS and \
                    not os.path.exists(env[SETTINGS["db"].env]):
                print(unnamed_database(args.env, env[SETTINGS["db"].env]), file=sys.stderr)
                return 2
        unneeded: dict[str, str] = {}  # what a command does not use: any value will do
        if args.command == "chat":  # no WeChat involved
            unneeded = {"WXBOT_TOKEN": "notusedinchat", "WXBOT_APPID": "-",
                        "WXBOT_APPSECRET": "-"}
        if args.command == "menu":  # no model involved, nor pushes
            unneeded = {"WXBOT_TOKEN": "notusedbymenu", "OPENAI_API_KEY": "-"}
        if args.command in ("status", "retry", "backup") or \
                (args.command == "learn" and not args.published):  # the database only
            unneeded = {"WXBOT_TOKEN": "notusedbystatus", "WXBOT_APPID": "-",
                        "WXBOT_APPSECRET": "-", "OPENAI_API_KEY": "-"}
        if args.command == "learn" and args.published:  # WeChat's API without pushes
            unneeded = {"WXBOT_TOKEN": "notusedbylearn", "OPENAI_API_KEY": "-"}
        # The example env file's empty WXBOT_APPID= leaves it unset for these, not empty.
        env = {**unneeded, **{key: value for key, value in env.items()
                              if value or key not in unneeded}}
        settings = Settings.from_env(env)
        SECRET_FILTER.add_settings(settings)  # every command, check and menu too
        if args.command not in ("chat", "status", "retry", "backup") and \
                (args.command != "learn" or args.published) and \
                settings.api_base.startswith("https:"):
            WeChatConnections.verifier()  # the CA bundle a setting names is readable
    except SettingsError as error:
        for problem in error.problems:
            print(f"wxbot: {problem}", file=sys.stderr)
        print(f"wxbot: set them as KEY=VALUE lines in {args.env or 'the environment'}; "
              "README → Settings says what each one is", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"wxbot: cannot read --env file: {error}", file=sys.stderr)
        return 2

    if args.command == "check":
        return check(settings, sys.stdout)
    if args.command == "status":
        return status(settings, sys.stdout)
    if args.command == "retry":
        return retry(settings, int(args.file), sys.stdout)
    if args.command == "backup":
        return backup(settings, args.file, sys.stdout)
    if args.command == "learn":
        return learn_command(settings, sources, args.published, args.list, args.forget,
                             sys.stdout)
    if args.command == "menu":
        return menu_command(settings, args.file, args.show, args.delete, sys.stdout)
    try:
        owner = OwnerFiles(settings)
    except FileProblem as error:
        for problem in error.problems:
            print(f"wxbot: {error.where()}: {problem}", file=sys.stderr)
        return 2
    if args.command == "chat":
        return chat(settings, sys.stdin, sys.stdout, owner)
    log.info("wxbot %s starting: %s", __version__, settings.describe())
    try:
        bot = Bot(settings, owner)
    except DatabaseUnusable as error:  # WXBOT_DB names a place this user may not write
        log.error("%s", error)
        return 2
    except CannotListen as error:
        log.error("%s", error)
        return 2
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    except (sqlite3.Error, RuntimeError) as error:
        log.error("cannot open the database %s: %s", settings.db, error)
        return 1

    signals = Signals()  # before start: a signal that comes during it stops it after
    bot.start()
    signals.serve(bot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
