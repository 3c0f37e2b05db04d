"""IPsec profiles and their resolution into concrete, validated settings (pure).

A profile is a named table of defaults. `resolve()` applies the inventory's overrides on top of it,
parses and validates every value (proposal grammar, durations, rekey sanity) and returns a frozen
`ResolvedSettings` that the renderers lay out verbatim. Unknown keys are errors: strongSwan silently
ignores a misspelled key (Wikimedia's `retramsmit_tries` shipped for years), so we must not.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from rollout import errors, model

TimingForm = Literal["swanctl", "margin"]
DpdAction = Literal["auto", "clear", "trap", "restart", "restart-initiator", "restart-greater"]

# ----------------------------------------------------------------------------------------------
# Durations
# ----------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, *, key: str = "duration") -> int:
    """`4h`, `13m`, `90s`, `1d` or an int (seconds) -> seconds."""
    if isinstance(value, bool):
        raise _bad(key, value, "a duration like 90s, 13m, 4h, 1d or an integer number of seconds")
    if isinstance(value, int):
        if value < 0:
            raise _bad(key, value, "a non-negative duration")
        return value
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise _bad(key, value, "a duration like 90s, 13m, 4h, 1d or an integer number of seconds")
    return int(match.group(1)) * _UNIT[match.group(2)]


def format_duration(seconds: int) -> str:
    """Seconds -> the largest single unit strongSwan accepts exactly (`2h47m` is NOT valid: `167m`)."""
    if seconds == 0:
        return "0"
    for suffix, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{suffix}"
    return f"{seconds}s"


# ----------------------------------------------------------------------------------------------
# Proposals (the token grammar strongSwan's proposal parser accepts, restricted to sane algorithms)
# ----------------------------------------------------------------------------------------------

_AES = ("aes128", "aes192", "aes256")
ENCRYPTION = frozenset({"aes", *_AES, *(f"{a}ctr" for a in _AES), "3des"})
AEAD = frozenset(
    {f"{a}{m}{icv}" for a in _AES for m in ("gcm", "ccm") for icv in (8, 12, 16)}
    | {f"{a}gcm{bits}" for a in _AES for bits in (64, 96, 128)}
    | {f"{a}ccm{bits}" for a in _AES for bits in (64, 96, 128)}
    | {"chacha20poly1305"}
)
INTEGRITY = frozenset({"sha1", "sha256", "sha384", "sha512", "aesxcbc"})
PRF = frozenset({"prfsha1", "prfsha256", "prfsha384", "prfsha512", "prfaesxcbc"})
KE = frozenset(
    {f"modp{n}" for n in (1024, 1536, 2048, 3072, 4096, 6144, 8192)}
    | {"ecp256", "ecp384", "ecp521", "ecp224bp", "ecp256bp", "ecp384bp", "ecp512bp"}
    | {"curve25519", "x25519", "curve448", "x448"}
)
ESN = frozenset({"esn", "noesn"})
ALL_TOKENS = ENCRYPTION | AEAD | INTEGRITY | PRF | KE | ESN | {"none"}


def validate_proposals(value: str, *, kind: Literal["ike", "esp"], require_pfs: bool, key: str) -> str:
    """Check a comma-separated proposal list; returns it normalised (lower case, no blanks)."""
    text = value.strip().lower().replace(" ", "") if isinstance(value, str) else ""
    if not text:
        raise _bad(key, value, "a non-empty proposal list such as aes256gcm16-prfsha384-ecp384")
    for proposal in text.split(","):
        _validate_proposal(proposal, kind=kind, require_pfs=require_pfs, key=key)
    return text


def _validate_proposal(proposal: str, *, kind: str, require_pfs: bool, key: str) -> None:
    tokens = proposal.split("-")
    unknown = [t for t in tokens if t not in ALL_TOKENS]
    if "default" in tokens or unknown:
        bad = "default" if "default" in tokens else unknown[0]
        close = difflib.get_close_matches(bad, sorted(ALL_TOKENS), n=1)
        hint = f"did you mean {close[0]}?" if close else "use explicit algorithms (see docs/rendering.md)"
        raise errors.RenderError(f"unknown or unsupported algorithm {bad!r} in proposal {proposal!r}",
                                 key=key, hint=hint)
    enc = [t for t in tokens if t in ENCRYPTION]
    aead = [t for t in tokens if t in AEAD]
    integ = [t for t in tokens if t in INTEGRITY]
    prf = [t for t in tokens if t in PRF]
    ke = [t for t in tokens if t in KE]

    def fail(why: str, fix: str) -> errors.RenderError:
        return errors.RenderError(f"proposal {proposal!r}: {why}", key=key, hint=fix)

    if not enc and not aead:
        raise fail("no encryption algorithm", "start with e.g. aes256gcm16")
    if enc and aead:
        raise fail("mixes AEAD and classic encryption", "use separate proposals for AEAD and non-AEAD")
    if aead and integ:
        raise fail("an AEAD algorithm needs no integrity algorithm", f"drop {integ[0]}")
    if enc and not integ:
        raise fail("classic encryption needs an integrity algorithm", "add e.g. sha256, or use AEAD")
    if kind == "ike":
        _check_ike(tokens, aead=bool(aead), prf=prf, ke=ke, fail=fail)
    else:
        _check_esp(tokens, prf=prf, ke=ke, require_pfs=require_pfs, fail=fail)


def _check_ike(tokens: list[str], *, aead: bool, prf: list[str], ke: list[str],
               fail: Callable[[str, str], errors.RenderError]) -> None:
    if "none" in tokens or any(t in ESN for t in tokens):
        raise fail("'none'/'esn'/'noesn' are ESP-only tokens", "remove them from the IKE proposal")
    if not ke:
        raise fail("an IKE proposal needs a key exchange (DH) group", "add e.g. ecp384 or x25519")
    if aead and not prf:
        raise fail("an AEAD IKE proposal needs a PRF", "add e.g. prfsha384")


def _check_esp(tokens: list[str], *, prf: list[str], ke: list[str], require_pfs: bool,
               fail: Callable[[str, str], errors.RenderError]) -> None:
    if prf:
        raise fail(f"{prf[0]} is an IKE-only token", "remove the PRF from the ESP proposal")
    if require_pfs and ("none" in tokens or not ke):
        raise fail("PFS is mandatory (require_pfs) but the proposal has no key exchange or lists 'none'",
                   "add a DH group such as ecp384 and drop 'none' (or set require_pfs: false)")


# ----------------------------------------------------------------------------------------------
# The settings table: every overridable key, its parser and what it means
# ----------------------------------------------------------------------------------------------

Parser = Callable[[str, object], object]


def _bad(key: str, value: object, expected: str) -> errors.RenderError:
    return errors.RenderError(f"invalid value {value!r}: expected {expected}", key=key)


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "no", "true", "false"):
        return value.lower() in ("yes", "true")
    raise _bad(key, value, "yes/no (true/false)")


def _int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(key, value, "an integer")
    try:
        number = int(value)
    except ValueError:
        raise _bad(key, value, "an integer") from None
    if number < 0:
        raise _bad(key, value, "a non-negative integer")
    return number


def _float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _bad(key, value, "a number")
    try:
        number = float(value)
    except ValueError:
        raise _bad(key, value, "a number") from None
    if number < 0:
        raise _bad(key, value, "a non-negative number")
    return number


def _duration(key: str, value: object) -> int:
    return parse_duration(value, key=key)


def _optional_duration(key: str, value: object) -> int | None:
    return None if value is None else parse_duration(value, key=key)


def _percent(key: str, value: object) -> int:
    text = str(value).strip().rstrip("%") if not isinstance(value, bool) else "x"
    if not text.isdigit():
        raise _bad(key, value, "a percentage like 100%")
    return int(text)


def _choice(*choices: str) -> Parser:
    def parse(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _bad(key, value, "one of " + ", ".join(choices))
        return value
    return parse


def _version(key: str, value: object) -> int:
    if value not in (2, "2"):
        raise _bad(key, value, "2 (IKEv2 only)")
    return 2


def _text(key: str, value: object) -> str:
    return str(value)


@dataclass(frozen=True)
class Spec:
    parse: Parser
    doc: str
    form: TimingForm | None = None  # timing keys belong to one form


SETTINGS: dict[str, Spec] = {
    "version": Spec(_version, "IKE version; only 2 (IKEv2) is offered: 0 would accept IKEv1 as responder"),
    "ike_proposals": Spec(_text, "IKE proposals (swanctl `proposals`, ipsec.conf `ike=...!`)"),
    "esp_proposals": Spec(_text, "ESP proposals (`esp_proposals`, ipsec.conf `esp=...!`)"),
    "require_pfs": Spec(_bool, "every ESP proposal must carry a DH group and no `none`"),
    "mobike": Spec(_bool, "MOBIKE (off: datacenter hosts do not roam)"),
    "encap": Spec(_bool, "force UDP encapsulation (off)"),
    "fragmentation": Spec(_bool, "IKE fragmentation"),
    "dpd_delay": Spec(_duration, "DPD interval when idle"),
    "dpd_action": Spec(_choice("auto", "clear", "trap", "restart", "restart-initiator", "restart-greater"),
                       "DPD action; `auto` = restart on the initiator/clear on the responder when fail-open, "
                       "trap when enforcing; `restart-greater` = Wikimedia's asymmetry"),
    "keyingtries": Spec(_int, "initiation attempts; 0 = forever"),
    "unique": Spec(_choice("no", "never", "replace", "keep"), "IKE_SA uniqueness policy"),
    "send_certreq": Spec(_bool, "send certificate requests"),
    "send_cert": Spec(_choice("always", "ifasked", "never"), "when to send our certificate"),
    "revocation": Spec(_choice("strict", "ifuri", "relaxed"), "remote certificate revocation policy"),
    "close_action": Spec(_choice("none", "clear", "trap", "start"), "action when the peer closes a CHILD"),
    "replay_window": Spec(_int, "ESP replay window (packets)"),
    "key_type": Spec(_choice("RSA", "ECDSA"), "private key type, for legacy ipsec.secrets only"),
    # swanctl-form timing
    "rekey_time": Spec(_duration, "IKE rekey interval (0 = no rekey)", "swanctl"),
    "reauth_time": Spec(_duration, "IKE reauthentication interval (0 = none)", "swanctl"),
    "over_time": Spec(_optional_duration, "IKE hard expiry after rekey/reauth time", "swanctl"),
    "rand_time": Spec(_optional_duration, "IKE rekey/reauth jitter", "swanctl"),
    "child_rekey_time": Spec(_duration, "CHILD_SA rekey interval", "swanctl"),
    "child_life_time": Spec(_duration, "CHILD_SA hard lifetime", "swanctl"),
    "child_rand_time": Spec(_duration, "CHILD_SA rekey jitter", "swanctl"),
    # margin (ipsec.conf / Wikimedia 2015) form timing
    "lifetime": Spec(_duration, "CHILD_SA lifetime (ipsec.conf `lifetime`)", "margin"),
    "ikelifetime": Spec(_duration, "IKE_SA lifetime (ipsec.conf `ikelifetime`)", "margin"),
    "margintime": Spec(_duration, "rekey this long before expiry (ipsec.conf `margintime`)", "margin"),
    "rekeyfuzz": Spec(_percent, "random increase of the margin, percent (ipsec.conf `rekeyfuzz`)", "margin"),
    "reauth": Spec(_bool, "IKE rekeying reauthenticates (ipsec.conf `reauth`)", "margin"),
}

CHARON_SETTINGS: dict[str, Spec] = {
    "make_before_break": Spec(_bool, "overlapping SAs during reauthentication"),
    "close_ike_on_child_failure": Spec(_bool, "close the IKE_SA if its CHILD_SA fails to establish"),
    "install_routes": Spec(_bool, "install routes into table 220 (not needed for transport mode)"),
    "install_virtual_ip": Spec(_bool, "install virtual IPs"),
    "dos_protection": Spec(_bool, "IKE_SA_INIT DoS protection (cookies)"),
    "retransmit_base": Spec(_float, "retransmission backoff base"),
    "retransmit_timeout": Spec(_float, "first retransmission timeout, seconds"),
    "retransmit_tries": Spec(_int, "retransmissions before giving up"),
    "retransmit_jitter": Spec(_int, "retransmission jitter, percent"),
    "retransmit_limit": Spec(_float, "upper bound of one retransmission timeout, seconds (0 = none)"),
    "keep_alive": Spec(_duration, "NAT keep-alive interval"),
    "reuse_ikesa": Spec(_bool, "reuse an existing IKE_SA for a new CHILD_SA"),
}


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A named table of defaults (values in their YAML/override spelling)."""

    name: str
    description: str
    settings: tuple[tuple[str, object], ...]
    charon: tuple[tuple[str, object], ...]

    @property
    def form(self) -> TimingForm:
        keys = {k for k, _ in self.settings}
        return "margin" if "margintime" in keys else "swanctl"


_COMMON: tuple[tuple[str, object], ...] = (
    ("version", 2), ("require_pfs", True), ("mobike", False), ("encap", False),
    ("fragmentation", True), ("dpd_delay", "30s"), ("keyingtries", 0), ("send_certreq", True),
    ("send_cert", "ifasked"), ("revocation", "relaxed"), ("close_action", "none"), ("replay_window", 32),
    ("key_type", "RSA"),
)

PROFILES: dict[str, Profile] = {
    "modern": Profile(
        name="modern",
        description="IKEv2, AEAD with mandatory PFS, explicit rekey/reauth, make-before-break",
        settings=(*_COMMON,
                  ("ike_proposals", "aes256gcm16-prfsha384-ecp384"), ("esp_proposals", "aes256gcm16-ecp384"),
                  ("dpd_action", "auto"), ("unique", "no"),
                  ("rekey_time", "4h"), ("reauth_time", "24h"), ("over_time", None), ("rand_time", None),
                  ("child_rekey_time", "1h"), ("child_life_time", "66m"), ("child_rand_time", "6m")),
        charon=(("make_before_break", True), ("install_routes", False), ("close_ike_on_child_failure", True)),
    ),
    "wmf-2015": Profile(
        name="wmf-2015",
        description="Wikimedia's 2015-2023 values (operations/puppet modules/strongswan), typo corrected",
        settings=(*_COMMON,
                  ("ike_proposals", "aes128gcm16-prfsha384-ecp384bp"),
                  ("esp_proposals", "aes128gcm16-ecp384bp-noesn"),
                  ("dpd_action", "restart-greater"), ("unique", "replace"),
                  ("lifetime", "1h"), ("ikelifetime", "3h"), ("margintime", "13m"), ("rekeyfuzz", "100%"),
                  ("reauth", True)),
        charon=(("make_before_break", True), ("close_ike_on_child_failure", True), ("dos_protection", False),
                ("retransmit_base", 1.2), ("retransmit_timeout", 2.0), ("retransmit_tries", 15)),
    ),
}
DEFAULT_PROFILE = "modern"


# ----------------------------------------------------------------------------------------------
# Resolved settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LegacyTiming:
    """The same timing in ipsec.conf terms (seconds, percent)."""

    lifetime: int
    ikelifetime: int
    margintime: int
    rekeyfuzz: int
    reauth: bool


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Rekey timing in swanctl terms (seconds) plus the ipsec.conf equivalent."""

    rekey_time: int
    reauth_time: int
    over_time: int | None
    rand_time: int | None
    child_rekey_time: int
    child_life_time: int
    child_rand_time: int
    legacy: LegacyTiming


@dataclass(frozen=True, kw_only=True)
class ResolvedSettings:
    """Every value the renderers need, parsed and validated. Durations are seconds."""

    profile: str
    form: TimingForm
    ike_proposals: str
    esp_proposals: str
    require_pfs: bool
    mobike: bool
    encap: bool
    fragmentation: bool
    dpd_delay: int
    dpd_action: DpdAction
    keyingtries: int
    unique: str
    send_certreq: bool
    send_cert: str
    revocation: str
    close_action: str
    replay_window: int
    key_type: str
    timing: Timing
    charon: tuple[tuple[str, str], ...]  # key -> rendered strongswan.conf value, in profile order

    def dpd_action_for(self, local: str, peer: str, *, initiator: bool, enforce: bool) -> str:
        """The concrete swanctl dpd_action for one connection."""
        action = self.dpd_action
        if action == "auto":
            action = "trap" if enforce else "restart-initiator"
        if action == "restart-initiator":
            return "restart" if initiator else "clear"
        if action == "restart-greater":  # Wikimedia: restart on the lexicographically greater FQDN
            return "restart" if local > peer else "clear"
        return action


_RESOLVED: dict[tuple[str, str, str], ResolvedSettings] = {}  # a memo: every host's render asks


def resolve(ipsec: model.IpsecSettings) -> ResolvedSettings:
    """Profile defaults + overrides -> validated settings. Raises errors.RenderError."""
    # The answer depends on these three alone. repr() keys the memo so that values equal in Python
    # but parsed or rendered differently (True / 1 / 1.0, 0.0 / -0.0) are not confused.
    key = (ipsec.profile, repr(ipsec.overrides), repr(ipsec.charon_overrides))
    settings = _RESOLVED.get(key)
    if settings is None:
        settings = _resolve(ipsec)
        if len(_RESOLVED) >= 32:
            _RESOLVED.clear()
        _RESOLVED[key] = settings
    return settings


def _resolve(ipsec: model.IpsecSettings) -> ResolvedSettings:
    profile = _profile(ipsec.profile)
    values = _apply(profile, ipsec.overrides)
    charon = _apply_charon(profile, ipsec.charon_overrides)
    timing = _timing(profile.form, values)
    return ResolvedSettings(
        profile=profile.name, form=profile.form,
        ike_proposals=validate_proposals(str(values["ike_proposals"]), kind="ike",
                                         require_pfs=bool(values["require_pfs"]), key="ike_proposals"),
        esp_proposals=validate_proposals(str(values["esp_proposals"]), kind="esp",
                                         require_pfs=bool(values["require_pfs"]), key="esp_proposals"),
        require_pfs=bool(values["require_pfs"]), mobike=bool(values["mobike"]), encap=bool(values["encap"]),
        fragmentation=bool(values["fragmentation"]), dpd_delay=_as_int(values["dpd_delay"]),
        dpd_action=_dpd(values["dpd_action"]),
        keyingtries=_as_int(values["keyingtries"]), unique=str(values["unique"]),
        send_certreq=bool(values["send_certreq"]), send_cert=str(values["send_cert"]),
        revocation=str(values["revocation"]), close_action=str(values["close_action"]),
        replay_window=_as_int(values["replay_window"]), key_type=str(values["key_type"]),
        timing=timing, charon=charon,
    )


def _as_int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _dpd(value: object) -> DpdAction:
    assert value in ("auto", "clear", "trap", "restart", "restart-initiator", "restart-greater")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _as_int(value)


def _profile(name: str) -> Profile:
    if name not in PROFILES:
        raise errors.RenderError(f"unknown profile {name!r}", key="ipsec.profile",
                                 hint="use one of: " + ", ".join(sorted(PROFILES)))
    return PROFILES[name]


def _unknown_key(key: str, valid: Mapping[str, Spec], section: str) -> errors.RenderError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.7)
    hint = f"did you mean {close[0]}? " if close else ""
    return errors.RenderError(f"unknown key {key!r}", key=f"{section}.{key}",
                              hint=f"{hint}valid keys: {', '.join(sorted(valid))}")


def _apply(profile: Profile, overrides: tuple[tuple[str, object], ...]) -> dict[str, object]:
    values = {k: SETTINGS[k].parse(k, v) if v is not None else None for k, v in profile.settings}
    for key, raw in overrides:
        spec = SETTINGS.get(key)
        if spec is None:
            raise _unknown_key(key, SETTINGS, "ipsec.overrides")
        if spec.form is not None and spec.form != profile.form:
            same = sorted(k for k, s in SETTINGS.items() if s.form == profile.form)
            raise errors.RenderError(
                f"{key!r} is a {spec.form}-form timing key but profile {profile.name!r} uses the "
                f"{profile.form} form", key=f"ipsec.overrides.{key}",
                hint="override " + ", ".join(same) + " instead")
        values[key] = spec.parse(key, raw)
    return values


def _apply_charon(profile: Profile, overrides: tuple[tuple[str, object], ...]) -> tuple[tuple[str, str], ...]:
    values: dict[str, object] = {k: CHARON_SETTINGS[k].parse(k, v) for k, v in profile.charon}
    for key, raw in overrides:
        spec = CHARON_SETTINGS.get(key)
        if spec is None:
            raise _unknown_key(key, CHARON_SETTINGS, "ipsec.charon")
        values[key] = spec.parse(key, raw)
    return tuple((k, _charon_value(k, v)) for k, v in values.items())


def _charon_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "keep_alive" and isinstance(value, int):
        return format_duration(value)
    return str(value)


# ----------------------------------------------------------------------------------------------
# Timing: both forms end up as swanctl values plus their ipsec.conf equivalent
# ----------------------------------------------------------------------------------------------


def _timing(form: TimingForm, values: Mapping[str, object]) -> Timing:
    if form == "margin":
        return _from_margin(values)
    return _from_swanctl(values)


def _from_margin(v: Mapping[str, object]) -> Timing:
    keys = ("lifetime", "ikelifetime", "margintime", "rekeyfuzz")
    life, ikelife, margin, fuzz = (_as_int(v[k]) for k in keys)
    reauth = bool(v["reauth"])
    spread = margin * (100 + fuzz) / 100
    for name, lifetime in (("lifetime", life), ("ikelifetime", ikelife)):
        if not spread < lifetime:
            raise errors.RenderError(
                f"rekey margin too large: margintime {format_duration(margin)} * (1 + rekeyfuzz {fuzz}%) = "
                f"{spread:.0f}s is not below {name} {format_duration(lifetime)}",
                key=f"ipsec.overrides.{name}",
                hint=f"lower margintime/rekeyfuzz or raise {name} above {spread:.0f}s")
    ike_interval = ikelife - margin
    rand = margin * fuzz // 100
    return Timing(
        rekey_time=0 if reauth else ike_interval, reauth_time=ike_interval if reauth else 0,
        over_time=margin, rand_time=rand,
        child_rekey_time=life - margin, child_life_time=life, child_rand_time=rand,
        legacy=LegacyTiming(lifetime=life, ikelifetime=ikelife, margintime=margin, rekeyfuzz=fuzz,
                            reauth=reauth),
    )


def _from_swanctl(v: Mapping[str, object]) -> Timing:
    rekey, reauth = _as_int(v["rekey_time"]), _as_int(v["reauth_time"])
    over, rand = _opt_int(v["over_time"]), _opt_int(v["rand_time"])
    crekey, clife, crand = (_as_int(v[k]) for k in ("child_rekey_time", "child_life_time", "child_rand_time"))
    _check_child(crekey, clife, crand)
    _check_ike_timing(rekey, reauth, over, rand)
    margin = clife - crekey
    legacy = LegacyTiming(
        lifetime=clife, margintime=margin, rekeyfuzz=crand * 100 // margin,
        reauth=reauth > 0 and (rekey == 0 or reauth <= rekey),
        ikelifetime=(reauth if reauth and (rekey == 0 or reauth <= rekey) else rekey) + margin)
    return Timing(rekey_time=rekey, reauth_time=reauth, over_time=over, rand_time=rand,
                  child_rekey_time=crekey, child_life_time=clife, child_rand_time=crand, legacy=legacy)


def _check_child(rekey: int, life: int, rand: int) -> None:
    key = "ipsec.overrides.child_rekey_time"
    if rekey <= 0:
        raise errors.RenderError("child_rekey_time must be positive", key=key, hint="e.g. 1h")
    if not rekey < life:
        raise errors.RenderError(
            f"child_rekey_time {format_duration(rekey)} must be below "
            f"child_life_time {format_duration(life)}",
            key=key, hint=f"set child_life_time to about {format_duration(rekey * 11 // 10)} (rekey + 10%)")
    if not rekey + rand <= life or rand <= 0:
        raise errors.RenderError(
            f"child_rand_time {format_duration(rand)} must be positive and fit between child_rekey_time "
            f"{format_duration(rekey)} and child_life_time {format_duration(life)}",
            key="ipsec.overrides.child_rand_time", hint=f"use {format_duration(life - rekey)}")


def _check_ike_timing(rekey: int, reauth: int, over: int | None, rand: int | None) -> None:
    if rekey == 0 and reauth == 0:
        raise errors.RenderError("neither rekey_time nor reauth_time is set: the IKE_SA would never renew",
                                 key="ipsec.overrides.rekey_time", hint="set rekey_time (e.g. 4h)")
    shortest = min(t for t in (rekey, reauth) if t)
    if isinstance(rand, int) and rand >= shortest:
        raise errors.RenderError(
            f"rand_time {format_duration(rand)} must be below the shortest of rekey_time/reauth_time "
            f"({format_duration(shortest)})", key="ipsec.overrides.rand_time",
            hint=f"use at most {format_duration(shortest // 10)} (10%) or leave it unset")
    if isinstance(over, int) and over <= 0:
        raise errors.RenderError("over_time must be positive", key="ipsec.overrides.over_time",
                                 hint="leave it unset (10% of the longer of rekey/reauth)")
