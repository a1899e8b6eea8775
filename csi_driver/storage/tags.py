"""Volume/snapshot metadata stored as LVM tags.

LVM tags allow only [A-Za-z0-9_+.-/=!:&#], at most 1024 characters, and may not start with '-'.
Metadata is a flat str->str map; each entry becomes one tag (or several, when long):

    berth.<key>=<value>            short entry
    berth.<key>#<n>=<chunk>        chunk n (0,1,...) of a long value

Keys and values are escaped: [A-Za-z0-9_.-] stay as they are (so `lvs -o tags` stays readable),
every other UTF-8 byte becomes ':' + two upper-case hex digits. ':' itself is escaped, so the
encoding is unambiguous and '=' / '#' never occur inside an escaped key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import InvalidRequest

PREFIX = "berth."
MAX_TAG_LEN = 1024
# Tags live in the VG metadata area (default ~1 MiB, shared by every LV): cap per-LV metadata.
MAX_META_CHARS = 16 * 1024
VERSION_KEY = "v"
VERSION = "1"
VERSION_TAG = f"{PREFIX}{VERSION_KEY}={VERSION}"

# Well-known keys.
KEY_NAME = "name"  # the CSI request name
KEY_KIND = "kind"  # "volume" | "snapshot"
KEY_STATE = "state"  # "creating" | "ready" | "deleting"
KEY_SOURCE = "src"  # content source: "snapshot:<lv>" | "volume:<lv>"
KEY_CREATED = "ctime"
KEY_ADOPTED = "adopted"  # the LV's name before `berth adopt` took it over
KEY_GROUP = "grp"  # a group snapshot's member: the group's key (storage/ids.py group_snapshot_key)
KEY_GROUP_SIZE = "gsize"  # ... and how many members the group has (a retry tells a whole group from a broken one)
PARAM_PREFIX = "p."  # CreateVolume parameters: p.<parameter key>
MUTABLE_PREFIX = "m."  # mutable parameters (CreateVolume, ControllerModifyVolume): m.<parameter key>

STATE_CREATING = "creating"
STATE_READY = "ready"
STATE_DELETING = "deleting"
# `berth adopt` in progress: never "creating", which the orphan audit may remove (an adopted LV holds the admin's data).
STATE_ADOPTING = "adopting"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_ESCAPED_RE = re.compile(r"(?:[A-Za-z0-9_.-]|:[0-9A-F]{2})*")
_CHUNK_RE = re.compile(r"(?P<key>[^#=]+)#(?P<idx>\d+)")


def escape(text: str) -> str:
    out: list[str] = []
    for b in text.encode("utf-8"):
        out.append(chr(b) if b in _SAFE else f":{b:02X}")
    return "".join(out)


def unescape(text: str) -> str:
    if not _ESCAPED_RE.fullmatch(text):
        raise ValueError(f"not an escaped tag value: {text!r}")
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == ":":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(text[i]))
            i += 1
    return raw.decode("utf-8")


def encode_tags(meta: Mapping[str, str]) -> list[str]:
    """Metadata map → list of LVM tags (always including the version marker)."""
    tags = [VERSION_TAG]
    total = 0
    for key in sorted(meta):
        value = meta[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(f"metadata {key!r} must map str to str")
        if not key:
            raise InvalidRequest("metadata key must not be empty")
        if key == VERSION_KEY:
            raise InvalidRequest(f"metadata key {VERSION_KEY!r} is reserved")
        ekey, evalue = escape(key), escape(value)
        head = f"{PREFIX}{ekey}="
        if len(head) + len(evalue) <= MAX_TAG_LEN:
            entry = [head + evalue]
        else:
            # Room for '#nnn' in the head; 1000 chunks is far beyond MAX_META_CHARS anyway.
            room = MAX_TAG_LEN - len(f"{PREFIX}{ekey}#999=")
            if room < 16:
                raise InvalidRequest(f"metadata key too long: {key[:40]!r}...")
            # Chunks are joined before unescaping, so a cut inside a ':HH' escape is harmless.
            pieces = [evalue[i : i + room] for i in range(0, len(evalue), room)]
            entry = [f"{PREFIX}{ekey}#{i}={c}" for i, c in enumerate(pieces)]
        total += sum(len(t) for t in entry)
        tags.extend(entry)
    if total > MAX_META_CHARS:
        raise InvalidRequest(f"metadata too large ({total} encoded chars, max {MAX_META_CHARS})")
    return tags


def decode_tags(tags: Iterable[str]) -> dict[str, str]:
    """LVM tags → metadata map. Foreign tags are ignored; malformed or incomplete entries are dropped
    (a half-written chunk set must read as 'missing', never as a truncated value)."""
    plain: dict[str, str] = {}
    chunks: dict[str, dict[int, str]] = {}
    for tag in tags:
        if not tag.startswith(PREFIX) or "=" not in tag:
            continue
        head, _, evalue = tag[len(PREFIX) :].partition("=")
        m = _CHUNK_RE.fullmatch(head)
        try:
            if m:
                chunks.setdefault(unescape(m["key"]), {})[int(m["idx"])] = evalue
            else:
                key = unescape(head)
                if key != VERSION_KEY:
                    plain[key] = unescape(evalue)
        except ValueError:
            continue
    for key, parts in chunks.items():
        if key in plain or sorted(parts) != list(range(len(parts))):
            continue
        try:
            plain[key] = unescape("".join(parts[i] for i in range(len(parts))))
        except ValueError:
            continue
    return plain


def berth_tags(tags: Iterable[str]) -> list[str]:
    """The subset of tags owned by Berth (what an update may delete)."""
    return [t for t in tags if t.startswith(PREFIX)]


def tags_for_key(tags: Iterable[str], key: str) -> list[str]:
    """Existing tags that carry key (plain or chunked)."""
    ekey = escape(key)
    return [t for t in tags if t.startswith(f"{PREFIX}{ekey}=") or t.startswith(f"{PREFIX}{ekey}#")]


def params_to_meta(params: Mapping[str, str], prefix: str = PARAM_PREFIX) -> dict[str, str]:
    return {prefix + k: v for k, v in params.items()}


def meta_to_params(meta: Mapping[str, str], prefix: str = PARAM_PREFIX) -> dict[str, str]:
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}
