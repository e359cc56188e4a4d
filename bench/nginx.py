"""
The fast upstream: nginx serving static answers shaped like OpenRouter's,
from a configuration and files written into the benchmark's temporary
directory (the system's nginx configuration is never read or touched).

    POST /api/v1/chat/completions   a chat completion as JSON (~0.6 KB)
    POST /api/v1/sse                a streamed chat completion, ~100 KB of SSE
    POST /api/v1/big                100 MB of SSE comments, for the slow reader

nginx's static module refuses POST with 405; C{error_page 405 =200 $uri}
answers it with the file instead, keeping the connection alive.
"""

from __future__ import annotations

import json
import os
import shutil

CHAT_PATH = "/api/v1/chat/completions"
SSE_PATH = "/api/v1/sse"
BIG_PATH = "/api/v1/big"

CHAT_REQUEST = json.dumps(
    {
        "model": "openai/gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello to the benchmark in one sentence."},
        ],
        "max_tokens": 64,
    }
).encode()

STREAM_REQUEST = json.dumps(
    {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "Write a long story."}],
        "stream": True,
    }
).encode()


def chatCompletion() -> bytes:
    """
    A non-streamed chat completion of the size OpenRouter sends for a short
    answer.
    """
    return json.dumps(
        {
            "id": "gen-1732600000-AbCdEfGhIjKlMnOpQrSt",
            "provider": "OpenAI",
            "model": "openai/gpt-4o-mini",
            "object": "chat.completion",
            "created": 1732600000,
            "choices": [
                {
                    "logprobs": None,
                    "finish_reason": "stop",
                    "native_finish_reason": "stop",
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello, benchmark! May your latencies be low and "
                        "your throughput high, and may every byte arrive in order.",
                        "refusal": None,
                        "reasoning": None,
                    },
                }
            ],
            "usage": _usage(28, 24),
        }
    ).encode() + b"\n"


def _usage(prompt: int, completion: int) -> dict:
    """
    The usage OpenRouter reports in every answer (usage accounting): tokens
    with their details, and the cost in credits.
    """
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": round(prompt * 15e-8 + completion * 6e-7, 9),
        "is_byok": False,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "audio_tokens": 0},
        "cost_details": {"upstream_inference_cost": None},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def sseBody(size: int = 100 * 1024) -> bytes:
    """
    A streamed chat completion of about C{size} bytes: OpenRouter's
    processing comment, one event per word, the final event, the usage
    event (which repeats the finish reason) and [DONE].
    """
    head = {
        "id": "gen-1732600000-AbCdEfGhIjKlMnOpQrSt",
        "provider": "OpenAI",
        "model": "openai/gpt-4o-mini",
        "object": "chat.completion.chunk",
        "created": 1732600000,
    }
    words = "the quick brown fox jumps over the lazy dog".split()
    parts = [b": OPENROUTER PROCESSING\n\n"]
    total = len(parts[0])
    index = 0
    while total < size:
        delta = {"role": "assistant", "content": " " + words[index % len(words)]}
        event = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]}
        part = b"data: " + json.dumps(event).encode() + b"\n\n"
        parts.append(part)
        total += len(part)
        index += 1
    final = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
    parts.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    accounting = {**final, "usage": _usage(12, index)}
    parts.append(b"data: " + json.dumps(accounting).encode() + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def writeBigFile(path: str, size: int) -> None:
    """
    Write C{size} bytes of SSE comment lines to C{path}.
    """
    line = b": " + b"x" * 1020 + b"\n\n"
    block = line * 1024
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = block[:left]
            f.write(chunk)
            left -= len(chunk)


_CONFIG = """\
worker_processes {workers};
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {root}/nginx-tmp/body;
  proxy_temp_path {root}/nginx-tmp/proxy;
  fastcgi_temp_path {root}/nginx-tmp/fastcgi;
  uwsgi_temp_path {root}/nginx-tmp/uwsgi;
  scgi_temp_path {root}/nginx-tmp/scgi;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {root}/www;
    location = {chat} {{ default_type application/json; error_page 405 =200 $uri; }}
    location = {sse} {{ default_type text/event-stream; error_page 405 =200 $uri; }}
    location = {big} {{ default_type text/event-stream; error_page 405 =200 $uri; }}
  }}
}}
"""


def prepare(root: str, port: int, *, workers: int = 1, bigSize: int = 0) -> tuple[str, dict]:
    """
    Write nginx's configuration and the files it serves under C{root}, and
    return the path of the configuration and the size of each answer.
    """
    os.chmod(root, 0o755)  # nginx's workers may run as nobody
    sizes = {}
    files = {CHAT_PATH: chatCompletion(), SSE_PATH: sseBody()}
    for path, body in files.items():
        target = os.path.join(root, "www", path.lstrip("/"))
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(target, "wb") as f:
            f.write(body)
        sizes[path] = len(body)
    if bigSize:
        writeBigFile(os.path.join(root, "www", BIG_PATH.lstrip("/")), bigSize)
        sizes[BIG_PATH] = bigSize
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, "www")):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.makedirs(os.path.join(root, "nginx-tmp"), exist_ok=True)
    config = os.path.join(root, "nginx.conf")
    with open(config, "w") as f:
        f.write(
            _CONFIG.format(
                workers=workers, root=root, port=port,
                chat=CHAT_PATH, sse=SSE_PATH, big=BIG_PATH,
            )
        )
    return config, sizes


# nginx as a reverse proxy: the "practical limit" for a proxy,
# streaming as hermux does (no buffering) over kept-alive upstream connections.
_PROXY_CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {root}/{name}.pid;
error_log {root}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {root}/{name}-tmp/body;
  proxy_temp_path {root}/{name}-tmp/proxy;
  fastcgi_temp_path {root}/{name}-tmp/fastcgi;
  uwsgi_temp_path {root}/{name}-tmp/uwsgi;
  scgi_temp_path {root}/{name}-tmp/scgi;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  upstream upstream {{ server 127.0.0.1:{upstreamPort}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def prepareProxy(root: str, name: str, port: int, upstreamPort: int) -> str:
    """
    Write the configuration of an nginx that proxies C{port} to
    C{upstreamPort}, and return its path.
    """
    os.makedirs(os.path.join(root, f"{name}-tmp"), exist_ok=True)
    config = os.path.join(root, f"{name}.conf")
    with open(config, "w") as f:
        f.write(_PROXY_CONFIG.format(root=root, name=name, port=port, upstreamPort=upstreamPort))
    return config


def findNginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None,
    )


def argv(nginx: str, root: str, config: str) -> list[str]:
    return [nginx, "-p", root, "-c", config]
