"""``scripts/demo``: the whole product on one machine (see the README).

    scripts/demo            # set up, start (or reuse) everything, verify, chat; leave it running
    scripts/demo stop       # stop what the demo started
    scripts/demo status     # what is running

vLLM (tiny model) -> cube-agent (SIMULATED SEV-SNP: the simulator stands in for the TEE, labelled
so wherever it shows) -> cube-proxy (SQLite) with an admin, a domain ``demo``, a user and a PAT;
then ``cube verify`` against the proxy domain and a streaming ``cube chat`` with end-to-end
encryption. State (database, logs, pid files, the PAT, the policy) lives in
``$CUBE_DEMO_DIR`` (default ``out/demo``); services are reused on the next run when healthy.
Ports: ``CUBE_DEMO_VLLM_PORT`` (8000), ``CUBE_DEMO_AGENT_PORT`` (8443), ``CUBE_DEMO_PROXY_PORT``
(8080). Secrets (admin password, PAT) are written to files of mode 0600, never printed except
the PAT in the final copy-paste snippet, which is the point of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
CACHE = Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache" / "cube")
STATE = Path(os.environ.get("CUBE_DEMO_DIR") or ROOT / "out" / "demo")
HOST = "127.0.0.1"
VLLM_PORT = int(os.environ.get("CUBE_DEMO_VLLM_PORT", "8000"))
AGENT_PORT = int(os.environ.get("CUBE_DEMO_AGENT_PORT", "8443"))
PROXY_PORT = int(os.environ.get("CUBE_DEMO_PROXY_PORT", "8080"))
MODEL = "cube-tiny"
DOMAIN = "demo"
ADMIN_EMAIL = "admin@demo.cube.local"
USER_EMAIL = "dev@demo.cube.local"
PROXY_URL = f"http://{HOST}:{PROXY_PORT}"
AGENT_URL = f"https://{HOST}:{AGENT_PORT}"
VLLM_URL = f"http://{HOST}:{VLLM_PORT}"
#: The simulator's default SEV-SNP launch measurement (attestation/sim/_snp.py).
SIM_MEASUREMENT = hashlib.sha384(b"cube-simulator measurement").hexdigest()
SERVICES = ("proxy", "agent", "vllm")  # stop order
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.1f}s] {message}", flush=True)


def heading(message: str) -> None:
    print(f"\n\033[1m== {message}\033[0m", flush=True)


def fail(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# -- files ---------------------------------------------------------------------------------------


def secret_file(name: str, make: Callable[[], str]) -> str:
    """A secret kept between runs in a 0600 file (created with ``make`` the first time)."""
    path = STATE / name
    if path.exists():
        return path.read_text().strip()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def run(
    args: Sequence[str],
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> str:
    done = subprocess.run(
        list(args),
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        cwd=ROOT,
    )
    if check and done.returncode != 0:
        fail(f"{shlex.join(args[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def run_showing(args: Sequence[str], name: str = "") -> str:
    """Run a setup script, relaying its stdout as progress lines; returns its last line."""
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # stderr: straight through
    )
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        if line.strip():
            last = line.strip()
            say(f"{name}: {last}" if name else last)
    if proc.wait() != 0:
        fail(f"{name} failed ({proc.returncode}); its output is above")
    return last


# -- processes -----------------------------------------------------------------------------------


def pid_of(name: str) -> int | None:
    try:
        pid = int((STATE / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def http_ok(url: str, path: str, *, timeout: float = 3) -> bool:
    host_port = url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    conn: http.client.HTTPConnection
    if url.startswith("https://"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # Health only: trust in the agent comes from its evidence, checked by cube verify.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def start(
    name: str,
    args: Sequence[str],
    *,
    env: dict[str, str],
    ready: Callable[[], bool],
    timeout: float,
    note: str,
) -> None:
    """Start ``args`` detached (its own session, output to ``name``.log) and wait for ``ready``,
    printing a progress line every 15 s."""
    log = STATE / f"{name}.log"
    say(f"{name}: starting ({note}); log {log}")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    t0 = time.monotonic()
    last = t0
    while not ready():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            fail(f"{name} exited with {proc.returncode} while starting; {log}:\n{tail}")
        if time.monotonic() - t0 > timeout:
            stop(name)
            fail(f"{name} was not ready after {timeout:.0f} s; see {log}")
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            say(f"{name}: still starting ({last - t0:.0f} s)")
        time.sleep(0.5)
    say(f"{name}: ready after {time.monotonic() - t0:.1f} s")


def stop(name: str) -> bool:
    pid = pid_of(name)
    (STATE / f"{name}.pid").unlink(missing_ok=True)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def ensure(
    name: str,
    url: str,
    health: str,
    args: Sequence[str],
    *,
    env: dict[str, str],
    timeout: float,
    note: str,
    fingerprint: str,
) -> bool:
    """Reuse ``name`` when the demo started it, it is healthy and its command line is unchanged;
    otherwise (re)start it. Returns True when it was (re)started."""
    stamp = STATE / f"{name}.args"
    if pid_of(name) is not None:
        same = stamp.exists() and stamp.read_text() == fingerprint
        if same and http_ok(url, health):
            say(f"{name}: already running (pid {pid_of(name)}), reused")
            return False
        say(f"{name}: running but {'unhealthy' if same else 'configured differently'}; restarting")
        stop(name)
    elif http_ok(url, health):
        fail(
            f"something else is serving {url} (not started by the demo); stop it or choose "
            f"another port (CUBE_DEMO_{name.upper()}_PORT)"
        )
    start(name, args, env=env, ready=lambda: http_ok(url, health), timeout=timeout, note=note)
    stamp.write_text(fingerprint)
    return True


# -- the steps -----------------------------------------------------------------------------------


def setup() -> tuple[Path, Path, str]:
    heading("1. Set up: the vLLM CPU build and the tiny model (cached under " + str(CACHE) + ")")
    say("vLLM venv: scripts/setup-vllm (first time ~4 min, 3.5 GB; then instant)")
    venv = Path(run_showing([str(ROOT / "scripts/setup-vllm")]))  # prints "setup-vllm: ..."
    model_dir = CACHE / "models" / MODEL
    say("tiny model: scripts/make-tiny-model (first time a few seconds; then instant)")
    printed = run_showing(
        [str(ROOT / "scripts/make-tiny-model"), str(model_dir)], "make-tiny-model"
    )
    digest = printed.splitlines()[-1].split()[-1].strip("()")
    manifest = json.loads((model_dir / "cube-model.json").read_text())
    if manifest.get("digest") != digest:
        fail(f"make-tiny-model printed {printed!r} but the manifest says {manifest.get('digest')}")
    say(f"tiny model: {model_dir} ({digest})")
    return venv, model_dir, digest


def start_vllm(venv: Path, model_dir: Path, digest: str) -> None:
    args = [
        str(venv / "bin" / "python"),
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", MODEL,
        "--host", HOST,
        "--port", str(VLLM_PORT),
        "--dtype", "float32",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    ensure(
        "vllm",
        VLLM_URL,
        "/v1/models",
        args,
        env=env,
        timeout=600,
        note="60-100 s; over 200 s with a cold compile cache",
        fingerprint=json.dumps([args, digest]),
    )


def start_proxy(admin_password: str) -> None:
    args = [
        str(BIN / "cube-proxy"),
        "--host", HOST,
        "--port", str(PROXY_PORT),
        "--database", str(STATE / "proxy.db"),
        "--issuer-url", PROXY_URL,
        "--admin-email", ADMIN_EMAIL,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_PROXY_")}
    env["CUBE_PROXY_ADMIN_PASSWORD"] = admin_password  # bootstrap only; never on the command line
    ensure(
        "proxy",
        PROXY_URL,
        "/health",
        args,
        env=env,
        timeout=60,
        note="SQLite database " + str(STATE / "proxy.db"),
        fingerprint=json.dumps(args),
    )


def agent_args(model_dir: Path, digest: str, jwks: Path) -> list[str]:
    return [
        str(BIN / "cube-agent"),
        "--host", HOST,
        "--port", str(AGENT_PORT),
        "--backend", "vllm",
        "--backend-url", VLLM_URL,
        "--model-name", MODEL,
        "--model-dir", str(model_dir),
        "--model-digest", digest,
        "--jwt-issuer", PROXY_URL,
        "--jwt-audience", DOMAIN,
        "--jwks-file", str(jwks),
        "--tee", "sim-sev-snp",
    ]  # fmt: skip


def start_agent(model_dir: Path, digest: str) -> str:
    """The agent trusts the proxy's token signing keys (its JWKS, fetched now); returns the
    agent's configuration digest (what its evidence names)."""
    jwks = STATE / "proxy-jwks.json"
    conn = http.client.HTTPConnection(HOST, PROXY_PORT, timeout=10)
    try:
        conn.request("GET", "/.well-known/jwks.json")
        body = conn.getresponse().read()
    finally:
        conn.close()
    jwks.write_bytes(body)
    args = agent_args(model_dir, digest, jwks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_AGENT_")}
    printed = json.loads(run([*args, "--print-config"], env=env))
    config_digest: str = printed["digest"]
    ensure(
        "agent",
        AGENT_URL,
        "/health",
        args,
        env=env,
        timeout=60,
        note="SIMULATED SEV-SNP: the simulator stands in for the TEE",
        fingerprint=json.dumps([args, hashlib.sha256(body).hexdigest()]),
    )
    return config_digest


def write_policy(model_digest: str, config_digest: str) -> Path:
    policy = {
        "format": "cube-policy/1",
        "description": "the demo's agent: a SIMULATED SEV-SNP guest; for development only",
        "allow_simulated": True,
        "sev_snp": {"measurements": [SIM_MEASUREMENT]},
        "model_digests": [model_digest],
        "config_digests": [config_digest],
        "max_evidence_age_seconds": 300,
    }
    path = STATE / "policy.json"
    path.write_text(json.dumps(policy, indent=2) + "\n")
    return path


def cube_admin(
    args: Sequence[str], *, token: str | None, stdin: str | None = None, check: bool = True
) -> str:
    env = {"CUBE_ADMIN_URL": PROXY_URL}
    if token is not None:
        env["CUBE_ADMIN_TOKEN"] = token
    return run([str(BIN / "cube"), "admin", *args], stdin=stdin, env=env, check=check)


def provision(admin_password: str, policy: Path) -> str:
    """Domain, user, membership, policy, backend and the user's PAT (each only once)."""
    login = ["login", "--email", ADMIN_EMAIL, "--password-stdin", "--print-token"]
    admin = cube_admin(login, token=None, stdin=admin_password).strip()
    domains = json.loads(cube_admin(["domains", "list"], token=admin))
    aliases = {d.get("alias") for d in _items(domains, "domains")}
    if DOMAIN not in aliases:
        cube_admin(["domains", "create", DOMAIN, "--name", "Cube demo"], token=admin)
        say(f"domain {DOMAIN!r}: created")
    else:
        say(f"domain {DOMAIN!r}: exists")
    user_password = secret_file("user-password", lambda: secrets.token_urlsafe(18))
    users = json.loads(cube_admin(["users", "list"], token=admin))
    if USER_EMAIL not in {u.get("email") for u in _items(users, "users")}:
        cube_admin(["users", "create", USER_EMAIL, "--password-stdin"], token=admin,
                   stdin=user_password)  # fmt: skip
        cube_admin(["members", "add", DOMAIN, USER_EMAIL, "--role", "member"], token=admin)
        say(f"user {USER_EMAIL}: created, member of {DOMAIN!r}")
    else:
        say(f"user {USER_EMAIL}: exists")
    cube_admin(["policies", "set", DOMAIN, str(policy)], token=admin)
    say(f"domain policy: {policy} (pins the SIMULATED agent's measurement, model and config)")
    backends = json.loads(cube_admin(["backends", "list", DOMAIN], token=admin))
    if AGENT_URL not in {b.get("url") for b in _items(backends, "backends")}:
        cube_admin(["backends", "add", DOMAIN, AGENT_URL, "--kind", "vllm", "--model", MODEL],
                   token=admin)  # fmt: skip
        say(f"backend {AGENT_URL}: registered for {DOMAIN!r}")
    else:
        say(f"backend {AGENT_URL}: registered")

    def new_pat() -> str:
        user_login = ["login", "--email", USER_EMAIL, "--password-stdin", "--print-token"]
        session = cube_admin(user_login, token=None, stdin=user_password).strip()
        created = json.loads(cube_admin(["tokens", "create", DOMAIN, "--name", "demo"],
                                        token=session))  # fmt: skip
        token: str = created["token"]
        return token

    pat_file = STATE / "pat"
    pat = secret_file("pat", new_pat)
    if not _pat_works(pat):
        say("the saved PAT is no longer accepted (database reset?): creating a new one")
        pat_file.unlink()
        pat = secret_file("pat", new_pat)
    say(f"PAT for {USER_EMAIL}: in {pat_file} (mode 0600)")
    return pat


def _items(answer: object, key: str) -> list[dict[str, object]]:
    if isinstance(answer, dict):
        answer = answer.get(key, [])
    return [a for a in answer if isinstance(a, dict)] if isinstance(answer, list) else []


def _pat_works(pat: str) -> bool:
    conn = http.client.HTTPConnection(HOST, PROXY_PORT, timeout=30)
    try:
        conn.request("GET", f"/{DOMAIN}/v1/models", headers={"Authorization": f"Bearer {pat}"})
        return conn.getresponse().status != 401
    finally:
        conn.close()


def verify_and_chat(policy: Path, pat: str) -> None:
    domain_url = f"{PROXY_URL}/{DOMAIN}"
    env = {"CUBE_API_KEY": pat}
    heading(f"5. cube verify {domain_url}: fresh nonce, evidence through the proxy, policy")
    print(f"$ cube verify {domain_url} --policy {policy.relative_to(ROOT)}", flush=True)
    done = subprocess.run(
        [str(BIN / "cube"), "verify", domain_url, "--policy", str(policy)],
        env={**os.environ, **env},
        check=False,
    )
    if done.returncode != 0:
        fail(f"cube verify refused the demo's agent (exit {done.returncode})")
    heading("6. A streaming chat through the proxy, END-TO-END ENCRYPTED to the attested agent")
    print("(the tiny model has random weights: its answer is word salad, streamed as it comes)")
    prompt = "Tell me a short story about a cube."
    print(f"$ echo {shlex.quote(prompt)} | cube chat {domain_url} --policy "
          f"{policy.relative_to(ROOT)} --max-tokens 48", flush=True)  # fmt: skip
    chatted = subprocess.run(
        [str(BIN / "cube"), "chat", domain_url, "--policy", str(policy), "--max-tokens", "48"],
        input=prompt + "\n",
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    if chatted.returncode != 0:
        fail(f"cube chat failed (exit {chatted.returncode})")


def snippet(policy: Path, pat: str) -> None:
    rel = policy.relative_to(ROOT)
    pat_file = STATE / "pat"
    heading("Running. Use it (copy and paste):")
    print(
        f"""
# The openai SDK, verified and END-TO-END ENCRYPTED (the proxy forwards only ciphertext):
.venv/bin/python - <<'PY'
import openai
from attestation.policy import load_policy
from cube_client import attested_http_client

url = "{PROXY_URL}/{DOMAIN}"
http = attested_http_client(url, load_policy("{rel}"), encrypt=True)
key = open("{pat_file}").read().strip()
client = openai.OpenAI(base_url=url + "/v1", api_key=key, http_client=http)
stream = client.chat.completions.create(
    model="{MODEL}", messages=[{{"role": "user", "content": "hello"}}], max_tokens=64, stream=True
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

# curl, plain (NOT end-to-end encrypted: the proxy can read this prompt and its answer):
curl -sN {PROXY_URL}/{DOMAIN}/v1/chat/completions \\
  -H "Authorization: Bearer {pat}" -H "Content-Type: application/json" \\
  -d '{{"model": "{MODEL}", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'

# Any OpenAI client from the environment (plain as well: the proxy sees the text):
export OPENAI_BASE_URL={PROXY_URL}/{DOMAIN}/v1 OPENAI_API_KEY=$(cat {pat_file})

# Verify again, or chat interactively (end-to-end encrypted):
export CUBE_API_KEY=$(cat {pat_file})
.venv/bin/cube verify {PROXY_URL}/{DOMAIN} --policy {rel}
.venv/bin/cube chat {PROXY_URL}/{DOMAIN} --policy {rel}
""",
        flush=True,
    )
    print(
        "The agent runs on a SIMULATED SEV-SNP guest: Cube's simulator stands in for the TEE, so\n"
        "this demonstrates the protocol, not confidentiality. Continue, Ollama, OpenAI clients:\n"
        f"docs/clients.md. Logs and state: {STATE}\n"
        "Stop everything: scripts/demo stop  (or: make demo-stop)",
        flush=True,
    )


def up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    os.chmod(STATE, 0o700)
    print(
        "\033[1;33mCube demo. The agent runs on a SIMULATED SEV-SNP platform (Cube's simulator, "
        "not a real TEE): everything here works as on real hardware except the hardware "
        "guarantee itself.\033[0m",
        flush=True,
    )
    venv, model_dir, digest = setup()
    admin_password = secret_file("admin-password", lambda: secrets.token_urlsafe(24))
    heading(f"2. vLLM on {VLLM_URL} (loopback only), serving {MODEL}")
    start_vllm(venv, model_dir, digest)
    heading(f"3. cube-proxy on {PROXY_URL} (SQLite) and cube-agent on {AGENT_URL} (SIMULATED)")
    start_proxy(admin_password)
    config_digest = start_agent(model_dir, digest)
    say(f"agent config digest {config_digest}, model digest {digest}")
    policy = write_policy(digest, config_digest)
    heading(f"4. Admin, domain {DOMAIN!r}, user, PAT, backend and policy (cube admin ...)")
    pat = provision(admin_password, policy)
    verify_and_chat(policy, pat)
    snippet(policy, pat)
    say(f"done in {time.monotonic() - T0:.1f} s")


def down() -> None:
    for name in SERVICES:
        if stop(name):
            say(f"{name}: stopped")
        else:
            say(f"{name}: not running")


def status() -> None:
    urls = {"vllm": (VLLM_URL, "/v1/models"), "agent": (AGENT_URL, "/health"),
            "proxy": (PROXY_URL, "/health")}  # fmt: skip
    for name in reversed(SERVICES):
        pid = pid_of(name)
        url, health = urls[name]
        state = "healthy" if pid and http_ok(url, health) else "unhealthy" if pid else "stopped"
        print(f"{name:6} {state:9} {url}" + (f" (pid {pid})" if pid else ""))


def main(argv: Sequence[str]) -> None:
    command = argv[0] if argv else "up"
    if command == "up":
        up()
    elif command == "stop":
        down()
    elif command == "status":
        status()
    else:
        fail(f"unknown command {command!r}: use 'scripts/demo', 'scripts/demo stop' or 'status'")


if __name__ == "__main__":
    main(sys.argv[1:])
