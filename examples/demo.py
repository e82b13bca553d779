"""`make demo`: the example chat app (examples/streamlit_app) on a full local stack.

- DATABASE_URL set: the app uses that PostgreSQL, with the Redis of REDIS_CONNECTION_STRING when
  that is set too (local_redis), else without (local_psql).
- Otherwise a throwaway PostgreSQL and Redis are started under ./.demo (examples/local_stack.py;
  their data stays there for the next run) and the app runs in local_redis mode on them.
- When the server binaries are missing, the app runs in local mode on JSON files in ./.chat_history.

The app listens on 127.0.0.1, port DEMO_PORT, else 8501 when free, else a free one; the URL is
printed. Ctrl-C stops the app (which writes back what is still dirty), then the servers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = HERE / "streamlit_app" / "app.py"
sys.path.insert(0, str(HERE))

from local_stack import LocalStack, StackUnavailable, free_port  # noqa: E402


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def pick_port() -> int:
    if os.environ.get("DEMO_PORT"):
        return int(os.environ["DEMO_PORT"])
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8501))
            return 8501
        except OSError:
            return free_port()


def app_environment(stack_urls: tuple[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LOCAL_TEST_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
    env.setdefault("LOCAL_TEST_USERNAME", "Demo user")
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    if stack_urls is not None:
        env["DATABASE_URL"], env["REDIS_CONNECTION_STRING"] = stack_urls
        env["CHAT_HISTORY_MODE"] = "local_redis"
    elif env.get("DATABASE_URL"):
        env.setdefault("CHAT_HISTORY_MODE", "local_redis" if env.get("REDIS_CONNECTION_STRING") else "local_psql")
    else:
        env["CHAT_HISTORY_MODE"] = "local"
    return env


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def stop_app(proc: subprocess.Popen) -> None:
    """Ctrl-C in a terminal already reached Streamlit (same process group); otherwise send it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C even when started from a script's background job (which ignores SIGINT), and `kill <pid>`,
    # end the demo the same way: the app, then the servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    stack = None
    stack_urls = None
    if not os.environ.get("DATABASE_URL"):
        try:
            stack = LocalStack(ROOT / ".demo")
            stack_urls = stack.start()
            say(f"started a throwaway PostgreSQL ({stack_urls[0]}) and Redis ({stack_urls[1]}) under {stack.root}")
        except StackUnavailable as why:
            if stack is not None:
                stack.stop()
            stack = None
            say(f"{why}: the app keeps chats in local JSON files (./.chat_history) instead")
            say("(`make servers` installs redis-server and PostgreSQL from Debian's packages)")
    env = app_environment(stack_urls)
    port = pick_port()
    url = f"http://127.0.0.1:{port}/"
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
        "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    proc = None
    try:
        proc = subprocess.Popen(command, cwd=ROOT, env=env)
        if not wait_until_serving(proc, url):
            say(f"the app did not start (exit code {proc.poll()})")
            return 1
        print(flush=True)
        say(f"the chat app is running in {env['CHAT_HISTORY_MODE']} mode: open {url}")
        say("press Ctrl-C to stop it" + (" and the servers" if stack else ""))
        print(flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        say("stopping the app")
        return 0
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave the servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proc is not None:
            stop_app(proc)
        if stack is not None:
            say("stopping PostgreSQL and Redis (their data stays in .demo/)")
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
