"""The configuration framework: loading, every validation rule, and the sample file."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import types
from pathlib import Path

import pytest

import l4proxy.config
from l4proxy.config import (
    HARD_MAX_CERT_TTL,
    CaConfig,
    CheckResult,
    ClaimMapping,
    Config,
    ConfigError,
    ControlConfig,
    GatewayConfig,
    JwksSourceKind,
    Problem,
    ProviderConfig,
    check_config,
    load_config,
)

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "l4proxy.toml"

GATEWAY = """
[gateway]
id = "gw-1"
state_dir = "state"
"""

CA = """
[ca]
dir = "certs"
"""


def provider(*lines: str, name: str = "corp", who: str = 'allowed_email_domains = ["example.com"]') -> str:
    """One [[identity.providers]] block: a valid one, plus ``lines``."""
    body = "\n".join(lines)
    return f"""
[[identity.providers]]
name = "{name}"
issuer = "https://login.example.com"
audience = "l4proxy"
{who}
{body}
"""


def write(tmp_path: Path, text: str, name: str = "l4proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def check(tmp_path: Path, text: str) -> CheckResult:
    return check_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in check(tmp_path, text).problems]


def only_problem(tmp_path: Path, text: str) -> Problem:
    result = check(tmp_path, text)
    assert len(result.problems) == 1, result.problems
    assert result.config is None
    return result.problems[0]


def assert_problem(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    p = only_problem(tmp_path, text)
    assert p.path == path
    assert phrase in p.message, p.message


# --- the sample configuration -------------------------------------------------------------


def test_sample_checks_clean() -> None:
    result = check_config(SAMPLE)
    assert result.problems == ()
    assert result.warnings == ()
    assert result.ok
    assert result.config == load_config(SAMPLE)


def test_sample_content() -> None:
    config = load_config(SAMPLE)
    assert config.source == SAMPLE
    assert config.gateway == GatewayConfig(id="gw-1", state_dir=SAMPLE.parent / "state")
    assert config.ca == CaConfig(dir=SAMPLE.parent / "certs")
    corp, ci = config.providers
    assert config.provider("corp") is corp and config.provider("nope") is None
    assert corp.jwks_source is JwksSourceKind.DISCOVERY and corp.jwks_location is None
    assert corp.allowed_email_domains == ("example.com",)
    # the CI workload-token provider
    assert ci.subject_claim == "repository"
    assert ci.jwks_source is JwksSourceKind.URL
    assert ci.jwks_location == "https://token.actions.githubusercontent.com/.well-known/jwks"
    assert ci.bound_claims == (("ref", ("refs/heads/main", "refs/tags/v*")), ("repository_owner", ("acme",)))
    assert ci.claim_mappings[0] == ClaimMapping(claim="repository", value="acme/app", groups=("ci-app",))
    assert ci.max_cert_ttl == 1800.0


def _documented_keys(cls: type) -> set[str]:
    keys = {f.name for f in dataclasses.fields(cls)} - {"jwks_source", "jwks_location", "source"}
    return keys | ({"jwks"} if cls is ProviderConfig else set())


@pytest.mark.parametrize("cls", [GatewayConfig, ControlConfig, CaConfig, ProviderConfig])
def test_sample_documents_every_key(cls: type) -> None:
    text = SAMPLE.read_text()
    for key in _documented_keys(cls):
        assert re.search(rf"^(# )?{key} = |\.{key}\]+$", text, re.MULTILINE), key


def test_sample_dev_provider_block_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    block = text.split("# [[identity.providers]]", 1)[1].split("# --- end dev", 1)[0]
    uncommented = "[[identity.providers]]" + re.sub(r"^# ", "", block, flags=re.MULTILINE)
    config = load_config(write(tmp_path, text + uncommented))
    dev = config.providers[-1]
    assert dev.name == "dev" and dev.issuer == "http://127.0.0.1:9000"


# --- results and errors -------------------------------------------------------------------


def test_problem_str_and_config_error_lists_every_problem(tmp_path: Path) -> None:
    assert str(Problem("gateway.colour", "unknown key")) == "gateway.colour: unknown key"
    path = write(tmp_path, GATEWAY + "colour = 1\n[control]\nrate_per_address = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == ["gateway.colour: unknown key",
                                            "control.rate_per_address: must be at least 1"]
    assert [p.path for p in info.value.problems] == ["gateway.colour", "control.rate_per_address"]
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == info.value.problems and str(copy) == str(info.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = """
[gateway]
id = "GW!"
state_dir = "state"
colour = "blue"
[control]
rate_per_identity = true
"""
    assert problems(tmp_path, text) == [
        ("gateway.colour", "unknown key"),
        ("gateway.id", "must be 1 to 63 lower-case letters, digits and '-', starting with a letter or digit"),
        ("control.rate_per_identity", "expected an integer, got a boolean"),
    ]


def test_warnings_do_not_fail_and_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, GATEWAY + CA + provider("allow_any_subject = true", who=""))
    result = check_config(path)
    assert result.ok and result.config is not None
    with caplog.at_level(logging.WARNING, logger="l4proxy.config"):
        load_config(path)
    assert "identity.providers[0].allow_any_subject: any subject" in caplog.text


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    (p,) = check_config(missing).problems
    assert p.path == "" and "cannot read" in p.message and str(missing) in str(p)
    (p,) = check_config(tmp_path).problems  # a directory
    assert "cannot read" in p.message
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(missing)


@pytest.mark.parametrize(("content", "phrase"), [
    (b"[gateway\n", "invalid TOML"),
    (b"[gateway]\nid = 'a'\nid = 'b'\n", "invalid TOML"),  # TOML itself refuses duplicate keys
    (b"[gateway]\nid = '\xff'\n", "not UTF-8"),
    (b"# " + b"x" * (1 << 20) + b"\n", "larger than 1 MiB"),
])
def test_bad_files(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_bytes(content)
    (p,) = check_config(path).problems
    assert p.path == "" and phrase in p.message


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GATEWAY.encode())
    assert check_config(path).ok


# --- defaults, paths, durations, sizes ------------------------------------------------------


def test_defaults_applied(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GATEWAY))
    assert config.control == ControlConfig()
    assert config.control.listen == ("127.0.0.1", 8443) and config.control.max_body == 64 << 10
    assert config.providers == () and config.ca is None
    config = load_config(write(tmp_path, GATEWAY + CA + provider()))
    assert config.ca == CaConfig(dir=tmp_path / "certs", trust_domain="l4proxy.local",
                                 breakglass_max_ttl=3600)
    (p,) = config.providers
    assert p == ProviderConfig(name="corp", issuer="https://login.example.com", audience="l4proxy",
                               jwks_source=JwksSourceKind.DISCOVERY, allowed_email_domains=("example.com",))
    assert p.subject_claim == "sub" and p.groups_claim is None and p.default_cert_ttl == 600.0


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = GATEWAY + '[ca]\ndir = "/abs/certs"\n' + provider('jwks = { file = "keys/jwks.json" }')
    write(conf_dir, text)
    config = load_config(Path("..") / "etc" / "l4proxy.toml")  # a relative config path, too
    conf_dir = conf_dir.resolve()
    assert config.source == conf_dir / "l4proxy.toml"
    assert config.gateway.state_dir == conf_dir / "state"
    assert config.ca is not None and config.ca.dir == Path("/abs/certs")
    assert config.providers[0].jwks_source is JwksSourceKind.FILE
    assert config.providers[0].jwks_location == str(conf_dir / "keys" / "jwks.json")


def test_durations_and_sizes_are_parsed(tmp_path: Path) -> None:
    text = GATEWAY + '[control]\nmax_body = 2048\n[ca]\ndir = "c"\nbreakglass_max_ttl = 1800\n' + provider(
        'default_cert_ttl = "1h30m"', 'max_cert_ttl = "2h"', "leeway = 0", 'max_token_bytes = "8KiB"',
        'jwks_min_cache = "90s"', "fetch_timeout = 2.5", 'max_token_age = "1d"')
    config = load_config(write(tmp_path, text))
    (p,) = config.providers
    assert config.control.max_body == 2048
    assert config.ca is not None and config.ca.breakglass_max_ttl == 1800.0
    assert (p.default_cert_ttl, p.max_cert_ttl, p.leeway) == (5400.0, 7200.0, 0.0)
    assert (p.max_token_bytes, p.jwks_min_cache) == (8192, 90.0)
    assert (p.fetch_timeout, p.max_token_age) == (2.5, 86400.0)


def test_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(SAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gateway = GatewayConfig(id="x", state_dir=Path())  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.providers[0].allow_any_subject = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.control.rate_per_identity = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Problem("a", "b").path = "c"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        check_config(SAMPLE).problems = ()  # type: ignore[misc]
    assert isinstance(config.providers, tuple) and isinstance(config.control.admin_groups, tuple)


# --- unknown and missing keys ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "path"), [
    (GATEWAY + "colour = 1\n", "gateway.colour"),
    (GATEWAY + "[colour]\n", "colour"),
    (GATEWAY + "[control]\nlisten_addr = '127.0.0.1:1'\n", "control.listen_addr"),
    (GATEWAY + CA + "rotate = true\n", "ca.rotate"),
    (GATEWAY + "[identity]\nproviderz = []\n", "identity.providerz"),
    (GATEWAY + CA + provider("colour = 1"), "identity.providers[0].colour"),
    (GATEWAY + CA + provider('jwks = { url = "https://x.example/j", colour = 1 }'),
     "identity.providers[0].jwks.colour"),
    (GATEWAY + CA + provider('[[identity.providers.claim_mappings]]\nclaim = "a"\nvalue = "b"\n'
                             'groups = ["g"]\ncolour = 1'), "identity.providers[0].claim_mappings[0].colour"),
    (GATEWAY + '"we ird.key" = 1\n', 'gateway."we ird.key"'),
])
def test_unknown_keys(tmp_path: Path, text: str, path: str) -> None:
    assert_problem(tmp_path, text, path, "unknown key")


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    text = '[gateway]\nid = "gw"\nstatedir = "s"\n'
    assert problems(tmp_path, text) == [("gateway.statedir", "unknown key (did you mean state_dir?)"),
                                        ("gateway.state_dir", "missing required key")]


@pytest.mark.parametrize("section", ["listeners", "targets", "recording", "limits", "policy", "masking",
                                     "approvals"])
def test_later_sections_are_not_accepted_yet(tmp_path: Path, section: str) -> None:
    assert_problem(tmp_path, GATEWAY + f"[{section}]\nx = 1\n", section, "unknown key")


@pytest.mark.parametrize(("text", "path", "phrase"), [
    ("", "gateway", "missing required table"),
    ("gateway = 1\n", "gateway", "expected a table, got an integer"),
    ('[gateway]\nstate_dir = "s"\n', "gateway.id", "missing required key"),
    ('[gateway]\nid = "gw"\n', "gateway.state_dir", "missing required key"),
    (GATEWAY + "[ca]\n", "ca.dir", "missing required key"),
    (GATEWAY + CA + '[[identity.providers]]\nissuer = "https://a.example"\naudience = "x"\n'
     "allow_any_subject = true",
     "identity.providers[0].name", "missing required key"),
    (GATEWAY + CA + '[[identity.providers]]\nname = "a"\naudience = "x"\nallow_any_subject = true',
     "identity.providers[0].issuer", "missing required key"),
    (GATEWAY + CA + '[[identity.providers]]\nname = "a"\nissuer = "https://a.example"\n'
     "allow_any_subject = true",
     "identity.providers[0].audience", "missing required key"),
    (GATEWAY + CA + provider('[[identity.providers.claim_mappings]]\nclaim = "a"\nvalue = "b"'),
     "identity.providers[0].claim_mappings[0].groups", "missing required key"),
    (GATEWAY + CA + provider('[[identity.providers.claim_mappings]]\nvalue = "b"\ngroups = ["g"]'),
     "identity.providers[0].claim_mappings[0].claim", "missing required key"),
])
def test_missing_required(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, text, path, phrase)


def test_ca_is_required_when_providers_exist(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + provider(), "ca", "nothing could mint")
    assert check(tmp_path, GATEWAY + "[identity]\nproviders = []\n").ok  # no providers, no CA needed


# --- types, strings -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "path", "phrase"), [
    (GATEWAY + "[control]\nrate_per_identity = true\n", "control.rate_per_identity",
     "expected an integer, got a boolean"),
    (GATEWAY + "[control]\nrate_per_address = '60'\n", "control.rate_per_address",
     "expected an integer, got a string"),
    (GATEWAY + "[control]\nrate_per_address = 6.0\n", "control.rate_per_address",
     "expected an integer, got a float"),
    ('[gateway]\nid = 7\nstate_dir = "s"\n', "gateway.id", "expected a string, got an integer"),
    ('[gateway]\nid = "gw"\nstate_dir = ["s"]\n', "gateway.state_dir", "expected a string, got an array"),
    (GATEWAY + "[control]\nlisten = 2024-01-01T00:00:00Z\n", "control.listen", "got a date-time"),
    (GATEWAY + "[control]\nadmin_groups = 'admins'\n", "control.admin_groups",
     "expected an array of strings, got a string"),
    (GATEWAY + "[control]\nadmin_groups = ['a', 1]\n", "control.admin_groups[1]",
     "expected a string, got an integer"),
    (GATEWAY + "[control]\nmax_body = true\n", "control.max_body", "expected a size"),
    (GATEWAY + "[control]\nmax_body = 1.5\n", "control.max_body", "expected a size"),
    (GATEWAY + CA + provider('allow_any_subject = "true"', who=""), "identity.providers[0].allow_any_subject",
     "expected a boolean"),
    (GATEWAY + CA + provider("leeway = true"), "identity.providers[0].leeway", "expected a duration"),
    (GATEWAY + CA + provider("leeway = 1979-05-27"), "identity.providers[0].leeway", "got a date"),
    (GATEWAY + CA + provider("leeway = 07:32:00"), "identity.providers[0].leeway", "got a time"),
    ("identity = []\n" + GATEWAY, "identity", "expected a table, got an array"),
    (GATEWAY + "[identity]\nproviders = 1\n", "identity.providers", "expected an array of tables"),
    (GATEWAY + "[identity]\nproviders = ['corp']\n", "identity.providers[0]",
     "expected a table, got a string"),
])
def test_wrong_types(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, text, path, phrase)


@pytest.mark.parametrize(("value", "phrase"), [
    ('""', "must not be empty"),
    ('"   "', "must not be empty"),
    ('" gw"', "leading or trailing whitespace"),
    ('"gw\\n"', "control characters"),
    ('"-gw"', "must be 1 to 63 lower-case letters"),
    ('"GW"', "must be 1 to 63 lower-case letters"),
    ('"' + "g" * 64 + '"', "must be 1 to 63 lower-case letters"),
])
def test_bad_gateway_id(tmp_path: Path, value: str, phrase: str) -> None:
    assert_problem(tmp_path, f'[gateway]\nid = {value}\nstate_dir = "s"\n', "gateway.id", phrase)


def test_empty_and_tilde_paths(tmp_path: Path) -> None:
    text = '[gateway]\nid = "gw"\nstate_dir = {}\n'
    assert_problem(tmp_path, text.format('""'), "gateway.state_dir", "must not be empty")
    assert_problem(tmp_path, text.format('"~/s"'), "gateway.state_dir", "not expanded")


def test_empty_strings_in_provider(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider('subject_claim = ""', 'groups_claim = ""', 'allowed_groups = [""]')
    assert problems(tmp_path, text) == [
        ("identity.providers[0].subject_claim", "must not be empty"),
        ("identity.providers[0].groups_claim", "must not be empty"),
        ("identity.providers[0].allowed_groups[0]", "must not be empty"),
    ]


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    marker = "s3cr3t-marker"
    text = f"""
[gateway]
id = "{marker}!"
state_dir = 5
"{marker}" = "{marker}"
[control]
listen = "{marker}"
max_body = "{marker}"
[ca]
dir = "certs"
trust_domain = "{marker}_"
[[identity.providers]]
name = "corp"
issuer = "https://user:{marker}@login.example.com"
audience = "l4proxy\\u0000{marker}"
jwks = {{ url = "http://{marker}.example.com/jwks" }}
algorithms = ["{marker}"]
leeway = "{marker}"
allowed_email_domains = ["@{marker}"]
"""
    result = check(tmp_path, text)
    assert len(result.problems) >= 11
    rendered = "\n".join(str(p) for p in result.problems)
    # the only place the marker may appear is as a key name (keys are not secrets)
    assert rendered.count(marker) == 1, rendered
    assert f'gateway."{marker}": unknown key' in rendered or f"gateway.{marker}: unknown key" in rendered


# --- control --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("[::1]:8443", ("::1", 8443)),
    ("[::]:0", ("::", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("gw.example.com:443", ("gw.example.com", 443)),
    ("0.0.0.0:443", ("0.0.0.0", 443)),
])
def test_good_addresses(tmp_path: Path, value: str, expected: tuple[str, int]) -> None:
    config = load_config(write(tmp_path, GATEWAY + f'[control]\nlisten = "{value}"\n'))
    assert config.control.listen == expected


@pytest.mark.parametrize(("value", "phrase"), [
    ("127.0.0.1", "missing ':PORT'"),
    ("127.0.0.1:99999", "the port must be"),
    ("127.0.0.1:-1", "the port must be"),
    ("127.0.0.1:http", "the port must be"),
    (":8443", "missing HOST"),
    ("::1:8443", "IPv6 address must be in brackets"),
    ("[::1]8443", "missing ']:PORT'"),
    ("[::1", "missing ']:PORT'"),
    ("[gw.example.com]:8443", "not an IPv6 address"),
    ("999.1.1.1:80", "not an IPv4 address"),
    ("bad_host:80", "not a host name"),
])
def test_bad_addresses(tmp_path: Path, value: str, phrase: str) -> None:
    p = only_problem(tmp_path, GATEWAY + f'[control]\nops_listen = "{value}"\n')
    assert p.path == "control.ops_listen"
    assert p.message.startswith("expected HOST:PORT or [IPv6]:PORT") and phrase in p.message


def test_control_values(tmp_path: Path) -> None:
    text = GATEWAY + """
[control]
listen = "[::1]:8443"
ops_listen = "127.0.0.1:0"
admin_groups = ["ops", "sec"]
rate_per_identity = 1
rate_per_address = 1000
max_body = "1MiB"
"""
    c = load_config(write(tmp_path, text)).control
    assert c == ControlConfig(listen=("::1", 8443), ops_listen=("127.0.0.1", 0), admin_groups=("ops", "sec"),
                              rate_per_identity=1, rate_per_address=1000, max_body=1 << 20)


@pytest.mark.parametrize(("line", "path", "phrase"), [
    ('listen = "127.0.0.1:9090"', "control.listen", "same address as control.ops_listen (its default)"),
    ('listen = "[::1]:1"\nops_listen = "[::1]:1"', "control.ops_listen", "same address as control.listen"),
    ('admin_groups = ["a", "b", "a"]', "control.admin_groups[2]", "duplicate entry (same as [0])"),
    ("rate_per_identity = 0", "control.rate_per_identity", "must be at least 1"),
    ('max_body = "512"', "control.max_body", "from 1KiB to 1MiB"),
    ('max_body = "2MiB"', "control.max_body", "from 1KiB to 1MiB"),
    ('max_body = "lots"', "control.max_body", "not a size"),
])
def test_control_rules(tmp_path: Path, line: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + "[control]\n" + line + "\n", path, phrase)


def test_port_zero_twice_is_not_a_duplicate(tmp_path: Path) -> None:
    assert check(tmp_path, GATEWAY + '[control]\nlisten = "127.0.0.1:0"\nops_listen = "127.0.0.1:0"\n').ok


# --- ca -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "path", "phrase"), [
    ('breakglass_max_ttl = "2h"', "ca.breakglass_max_ttl", "at most 1h"),
    ('breakglass_max_ttl = "0s"', "ca.breakglass_max_ttl", "more than 0s"),
    ('breakglass_max_ttl = "soon"', "ca.breakglass_max_ttl", "not a duration"),
    ('trust_domain = "L4proxy.local"', "ca.trust_domain", "DNS-like name"),
    ('trust_domain = "l4proxy..local"', "ca.trust_domain", "DNS-like name"),
    ('trust_domain = "l4proxy/x"', "ca.trust_domain", "DNS-like name"),
    ('trust_domain = "-l4proxy.local"', "ca.trust_domain", "DNS-like name"),
    ('dir = ""', "ca.dir", "must not be empty"),
])
def test_ca_rules(tmp_path: Path, line: str, path: str, phrase: str) -> None:
    text = GATEWAY + "[ca]\n" + (line if line.startswith("dir") else 'dir = "certs"\n' + line) + "\n"
    assert_problem(tmp_path, text, path, phrase)


def test_ca_values(tmp_path: Path) -> None:
    text = GATEWAY + '[ca]\ndir = "pki"\ntrust_domain = "gw.acme-corp.example"\nbreakglass_max_ttl = "30m"\n'
    assert load_config(write(tmp_path, text)).ca == CaConfig(dir=tmp_path / "pki",
                                                              trust_domain="gw.acme-corp.example",
                                                              breakglass_max_ttl=1800.0)


# --- identity providers ---------------------------------------------------------------------

P0 = "identity.providers[0]"


def test_provider_declaring_nobody_is_a_problem(tmp_path: Path) -> None:
    p = only_problem(tmp_path, GATEWAY + CA + provider(who=""))
    assert p.path == P0
    assert p.message == ("declares nobody who may enroll: set bound_claims, allowed_email_domains or "
                         "allowed_groups (or allow_any_subject = true)")
    # empty declarations declare nobody either
    empty = provider("allowed_groups = []", "[identity.providers.bound_claims]", who="")
    assert_problem(tmp_path, GATEWAY + CA + empty, P0, "declares nobody")


def test_allow_any_subject_is_a_warning(tmp_path: Path) -> None:
    result = check(tmp_path, GATEWAY + CA + provider("allow_any_subject = true", who=""))
    assert result.problems == ()
    assert result.warnings == (Problem(f"{P0}.allow_any_subject",
                                       "any subject of this issuer and audience may enroll"),)
    assert result.config is not None and result.config.providers[0].allow_any_subject


def test_allow_any_subject_with_constraints_is_a_problem(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider("allow_any_subject = true"), f"{P0}.allow_any_subject",
                   "cannot be combined")


@pytest.mark.parametrize("who", [
    'allowed_email_domains = ["example.com"]',
    'allowed_groups = ["eng"]\ngroups_claim = "groups"',
    '[identity.providers.bound_claims]\nhd = "example.com"',
])
def test_any_one_constraint_is_enough(tmp_path: Path, who: str) -> None:
    result = check(tmp_path, GATEWAY + CA + provider(who=who))
    assert result.ok and result.warnings == ()


def test_invalid_constraint_does_not_also_report_nobody(tmp_path: Path) -> None:
    assert problems(tmp_path, GATEWAY + CA + provider(who="allowed_email_domains = 5")) == [
        (f"{P0}.allowed_email_domains", "expected an array of strings, got an integer")]


def test_allowed_groups_need_a_source_of_groups(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider(who='allowed_groups = ["eng"]'), f"{P0}.allowed_groups",
                   "set groups_claim or claim_mappings")
    mapping = '[[identity.providers.claim_mappings]]\nclaim = "repo"\nvalue = "a/b"\ngroups = ["eng"]'
    mapped = provider(mapping, who='allowed_groups = ["eng"]')
    assert check(tmp_path, GATEWAY + CA + mapped).ok


def test_duplicate_provider_names(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider() + provider(name="other") + provider()
    assert problems(tmp_path, text) == [
        ("identity.providers[2].name", "duplicate provider name (same as identity.providers[0].name)")]


@pytest.mark.parametrize(("name", "phrase"), [
    ("breakglass", "reserved name"),
    ("Corp", "1 to 32 lower-case letters"),
    ("1corp", "1 to 32 lower-case letters"),
    ("c" * 33, "1 to 32 lower-case letters"),
    ("corp/x", "1 to 32 lower-case letters"),
])
def test_bad_provider_names(tmp_path: Path, name: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider(name=name), f"{P0}.name", phrase)


def test_provider_name_matches_the_identity_model() -> None:
    from l4proxy.identity._model import PROVIDER_NAME
    assert PROVIDER_NAME.fullmatch("c" + "-" * 31) and not PROVIDER_NAME.fullmatch("c" * 33)


@pytest.mark.parametrize(("issuer", "phrase"), [
    ("http://login.example.com", "must be https://"),
    ("http://10.0.0.1:8080", "must be https://"),
    ("http://127.example.com", "must be https://"),
    ("ftp://login.example.com", "must be an https:// URL"),
    ("HTTPS://login.example.com", "must be an https:// URL"),
    ("login.example.com", "must be an https:// URL"),
    ("https://", "must name a host"),
    ("https://login.example.com?tenant=1", "must not have a query or fragment"),
    ("https://login.example.com#x", "must not have a query or fragment"),
    ("https://user:pw@login.example.com", "must not contain credentials"),
    ("https://login.example.com:99999", "not a valid URL"),
    ("https://login.example .com", "must not contain whitespace"),
])
def test_bad_issuers(tmp_path: Path, issuer: str, phrase: str) -> None:
    text = GATEWAY + CA + provider().replace("https://login.example.com", issuer)
    assert_problem(tmp_path, text, f"{P0}.issuer", phrase)


@pytest.mark.parametrize("issuer", ["http://127.0.0.1:9000", "http://127.1.2.3", "http://[::1]:9000",
                                    "http://localhost:9000/realms/dev", "https://login.example.com/tenant/"])
def test_good_issuers(tmp_path: Path, issuer: str) -> None:
    text = GATEWAY + CA + provider().replace("https://login.example.com", issuer)
    assert load_config(write(tmp_path, text)).providers[0].issuer == issuer


@pytest.mark.parametrize(("jwks", "path", "phrase"), [
    ('"https://x.example/jwks"', "jwks", 'must be "discovery"'),
    ("5", "jwks", 'must be "discovery"'),
    ("{}", "jwks", "set exactly one of url or file"),
    ('{ url = "https://x.example/j", file = "j.json" }', "jwks", "set exactly one of url or file"),
    ('{ url = "http://x.example/j" }', "jwks.url", "must be https://"),
    ('{ url = "https://u:p@x.example/j" }', "jwks.url", "must not contain credentials"),
    ('{ url = "https://x.example/j#k" }', "jwks.url", "must not have a fragment"),
    ('{ url = 5 }', "jwks.url", "expected a string"),
    ('{ file = "" }', "jwks.file", "must not be empty"),
])
def test_bad_jwks(tmp_path: Path, jwks: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider(f"jwks = {jwks}"), f"{P0}.{path}", phrase)


@pytest.mark.parametrize(("jwks", "kind", "location"), [
    ('"discovery"', JwksSourceKind.DISCOVERY, None),
    ('{ url = "https://x.example/jwks?v=2" }', JwksSourceKind.URL, "https://x.example/jwks?v=2"),
    ('{ url = "http://127.0.0.1:9000/jwks" }', JwksSourceKind.URL, "http://127.0.0.1:9000/jwks"),
    ('{ file = "/etc/idp/jwks.json" }', JwksSourceKind.FILE, "/etc/idp/jwks.json"),
])
def test_good_jwks(tmp_path: Path, jwks: str, kind: JwksSourceKind, location: str | None) -> None:
    (p,) = load_config(write(tmp_path, GATEWAY + CA + provider(f"jwks = {jwks}"))).providers
    assert (p.jwks_source, p.jwks_location) == (kind, location)


@pytest.mark.parametrize(("line", "path", "phrase"), [
    ('algorithms = ["HS256"]', "algorithms[0]", "not allowed (choose from EdDSA, ES256, PS256, RS256)"),
    ('algorithms = ["RS256", "none"]', "algorithms[1]", "not allowed"),
    ('algorithms = ["rs256"]', "algorithms[0]", "not allowed"),
    ("algorithms = []", "algorithms", "must not be empty"),
    ('algorithms = ["ES256", "ES256"]', "algorithms[1]", "duplicate entry (same as [0])"),
    ('max_cert_ttl = "25h"', "max_cert_ttl", "at most 24h"),
    ('default_cert_ttl = "48h"', "default_cert_ttl", "at most 24h"),
    ('default_cert_ttl = "2h"', "default_cert_ttl", f"must not exceed {P0}.max_cert_ttl"),
    ('max_cert_ttl = "5m"', "default_cert_ttl", f"must not exceed {P0}.max_cert_ttl"),
    ("default_cert_ttl = 0", "default_cert_ttl", "more than 0s"),
    ('default_cert_ttl = "-5m"', "default_cert_ttl", "not a duration"),
    ("default_cert_ttl = -300", "default_cert_ttl", "not a duration"),
    ("default_cert_ttl = nan", "default_cert_ttl", "not a duration"),
    ("max_token_age = inf", "max_token_age", "not a duration"),
    ('leeway = "6m"', "leeway", "at most 5m"),
    ('max_token_lifetime = "0s"', "max_token_lifetime", "more than 0s"),
    ('max_token_bytes = "2MiB"', "max_token_bytes", "from 1 byte to 1MiB"),
    ("max_token_bytes = 0", "max_token_bytes", "from 1 byte to 1MiB"),
    ('jwks_min_cache = "2d"', "jwks_min_cache", f"must not exceed {P0}.jwks_max_cache"),
    ('jwks_refetch_interval = "0s"', "jwks_refetch_interval", "more than 0s"),
    ('fetch_timeout = "10 s"', "fetch_timeout", "not a duration"),
    ('fetch_timeout = "10s\\n"', "fetch_timeout", "not a duration"),
    ('allowed_email_domains = ["example.com", "EXAMPLE.com"]', "allowed_email_domains[1]", "duplicate entry"),
    ('allowed_email_domains = ["@example.com"]', "allowed_email_domains[0]", "without '@'"),
    ('allowed_email_domains = ["localhost"]', "allowed_email_domains[0]", "a domain name like example.com"),
    ('allowed_groups = ["eng", "eng"]\ngroups_claim = "groups"', "allowed_groups[1]", "duplicate entry"),
])
def test_provider_rules(tmp_path: Path, line: str, path: str, phrase: str) -> None:
    lines = line.split("\n")
    who = lines[0] if line.startswith("allowed_email_domains") else 'allowed_email_domains = ["example.com"]'
    extra = lines[1:] if line.startswith("allowed_email_domains") else lines
    assert_problem(tmp_path, GATEWAY + CA + provider(*extra, who=who), f"{P0}.{path}", phrase)


def test_provider_values(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider(
        'subject_claim = "email"', 'groups_claim = "roles"', 'allowed_groups = ["eng"]',
        'algorithms = ["ES256"]', 'max_cert_ttl = "24h"', 'default_cert_ttl = "24h"', 'leeway = "5m"',
        'jwks_min_cache = "24h"', 'jwks_max_staleness = 0',
        who='allowed_email_domains = ["Example.COM", "corp.example.org"]')
    (p,) = load_config(write(tmp_path, text)).providers
    assert p.subject_claim == "email" and p.groups_claim == "roles"
    assert p.allowed_email_domains == ("example.com", "corp.example.org")  # folded to lower case
    assert p.algorithms == ("ES256",)
    assert p.max_cert_ttl == p.default_cert_ttl == HARD_MAX_CERT_TTL
    assert (p.leeway, p.jwks_min_cache, p.jwks_max_staleness) == (300.0, 86400.0, 0.0)


def test_bound_claims(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider("""
[identity.providers.bound_claims]
repository_owner = "acme"
ref = ["refs/heads/main", "refs/tags/v*"]
"https://example.com/claims/org" = "acme"
""", who="")
    (p,) = load_config(write(tmp_path, text)).providers
    assert p.bound_claims == (
        ("https://example.com/claims/org", ("acme",)),
        ("ref", ("refs/heads/main", "refs/tags/v*")),
        ("repository_owner", ("acme",)),
    )


@pytest.mark.parametrize(("body", "path", "phrase"), [
    ("owner = []", "bound_claims.owner", "must not be empty"),
    ("owner = 5", "bound_claims.owner", "expected a string or an array of strings, got an integer"),
    ('owner = ["a", "a"]', "bound_claims.owner[1]", "duplicate entry"),
    ('owner = ""', "bound_claims.owner", "must not be empty"),
    ('owner.name = "a"', "bound_claims.owner", "got a table"),
    ('"" = "a"', 'bound_claims.""', "claim name must be non-empty"),
    ('"org.id" = 1', 'bound_claims."org.id"', "expected a string or an array"),
])
def test_bad_bound_claims(tmp_path: Path, body: str, path: str, phrase: str) -> None:
    text = GATEWAY + CA + provider("[identity.providers.bound_claims]\n" + body)
    assert_problem(tmp_path, text, f"{P0}.{path}", phrase)
    assert_problem(tmp_path, GATEWAY + CA + provider("bound_claims = 5"), f"{P0}.bound_claims",
                   "expected a table of claim = value(s)")


def test_match_everything_bound_claim_is_a_warning(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider('[identity.providers.bound_claims]\nowner = ["acme", "**"]', who="")
    result = check(tmp_path, text)
    assert result.ok
    assert result.warnings == (Problem(f"{P0}.bound_claims.owner",
                                       "matches every value: it only requires the claim to be present"),)


def test_claim_mappings(tmp_path: Path) -> None:
    mappings = """
[[identity.providers.claim_mappings]]
claim = "repository"
value = "acme/app"
groups = ["ci-app"]
[[identity.providers.claim_mappings]]
claim = "repository"
value = "acme/etl"
groups = ["ci-etl", "writers"]
"""
    (p,) = load_config(write(tmp_path, GATEWAY + CA + provider(mappings))).providers
    assert p.claim_mappings == (
        ClaimMapping(claim="repository", value="acme/app", groups=("ci-app",)),
        ClaimMapping(claim="repository", value="acme/etl", groups=("ci-etl", "writers")),
    )
    dup = mappings.replace("acme/etl", "acme/app")
    assert_problem(tmp_path, GATEWAY + CA + provider(dup), f"{P0}.claim_mappings[1]",
                   f"duplicate mapping (same claim and value as {P0}.claim_mappings[0])")
    empty = mappings.replace('["ci-app"]', "[]")
    assert_problem(tmp_path, GATEWAY + CA + provider(empty), f"{P0}.claim_mappings[0].groups",
                   "must not be empty")
    assert_problem(tmp_path, GATEWAY + CA + provider("claim_mappings = 1"), f"{P0}.claim_mappings",
                   "expected an array of tables")


def test_problems_in_second_provider_are_indexed(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider() + provider("leeway = '1h'", name="ci")
    assert_problem(tmp_path, text, "identity.providers[1].leeway", "at most 5m")


# --- public surface -------------------------------------------------------------------------


def test_public_surface_is_explicit() -> None:
    names = l4proxy.config.__all__
    assert len(names) == len(set(names))
    public = {n for n, v in vars(l4proxy.config).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(names)
    assert {"Config", "GatewayConfig", "ControlConfig", "ProviderConfig", "ClaimMapping", "CaConfig",
            "JwksSourceKind", "load_config", "check_config", "ConfigError", "Problem",
            "CheckResult"} <= public
    assert Config.__dataclass_params__.frozen  # type: ignore[attr-defined]
