"""Dense descriptions from a teacher: any OpenAI-compatible chat endpoint (``curate.som.teacher``).

One request per marked image (``POST {url}/chat/completions``, the image inline as a PNG data
URL, temperature 0). The record keeps what was asked and who answered: ``{"model", "url",
"request": {...the body, the image replaced by its path...}, "answer"}``. A failed request
raises :class:`TeacherError` (the sample is quarantined ``teacher_error`` with the reason).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any

from cluster.spec import TeacherSection


class TeacherError(RuntimeError):
    pass


def describe(teacher: TeacherSection, png: bytes, image_ref: str) -> dict[str, Any]:
    """Ask the teacher about one marked image; returns the record (see module doc)."""
    def body(image_url: str) -> dict[str, Any]:
        return {"model": teacher.model, "temperature": 0, "max_tokens": teacher.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": teacher.prompt},
                    {"type": "image_url", "image_url": {"url": image_url}}]}]}

    data = json.dumps(body("data:image/png;base64," + base64.b64encode(png).decode())).encode()
    headers = {"Content-Type": "application/json"}
    if teacher.api_key_env and os.environ.get(teacher.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[teacher.api_key_env]}"
    req = urllib.request.Request(f"{teacher.url}/chat/completions", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=teacher.timeout_s) as resp:
            answer = json.loads(resp.read())
        text = answer["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as err:
        raise TeacherError(f"{teacher.url} answered {err.code}: {err.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as err:
        raise TeacherError(f"{teacher.url} unreachable: {err}") from None
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise TeacherError(f"{teacher.url}: not an OpenAI chat completion ({type(err).__name__}: {err})") from None
    if not isinstance(text, str) or not text.strip():
        raise TeacherError(f"{teacher.url}: empty answer")
    return {"model": teacher.model, "answered_by": answer.get("model", teacher.model), "url": teacher.url,
            "request": body(image_ref), "answer": text.strip()}
