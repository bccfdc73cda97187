"""BFCL V4's web-search tools over a pluggable backend, with optional injected network failures.

The two tools and their result shapes are BFCL's ``WebSearchAPI``: ``search_engine_query`` returns a
list of ``{"title", "href", "body"}`` (``body`` dropped in the No-Snippet variant) or an error dict;
``fetch_url_content`` refuses a non-http(s) URL with an exception, and returns ``{"content": …}`` or
``{"error": "An error occurred while fetching …"}``. Where results come from is a ``SearchBackend``.

Injected failures: BFCL's class can answer a successful fetch with a realistic network error (the
paper evaluates with them on; the 2026.3.23 package ships the switch off). ``failure_rate`` turns it
on; the draw uses a random generator seeded per episode, so a run is reproducible.
"""

from __future__ import annotations

import random
import urllib.parse
from typing import Any

from envtune.environments.bfcl_v4.html_text import html_to_markdown, html_to_text
from envtune.environments.bfcl_v4.search_backends import FetchError, SearchBackend, SearchError

MAX_RESULTS_CAP = 100
"""No backend returns more than this many results, whatever ``max_results`` asks for."""
MAX_CONTENT_CHARS = 200_000
"""Longest page content returned to the model (a page is cut there, with a note)."""

_FAILURES = (
    "503 Server Error: Service Unavailable for url: {url}",
    "429 Client Error: Too Many Requests for url: {url}",
    "403 Client Error: Forbidden for url: {url}",
    "HTTPSConnectionPool(host='{host}', port=443): Read timed out. (read timeout=5)",
    "HTTPSConnectionPool(host='{host}', port=443): Max retries exceeded with url: {path} "
    "(Caused by ConnectTimeoutError(<urllib3.connection.HTTPSConnection object at 0x{address:x}>, "
    "'Connection to {host} timed out. (connect timeout=5)'))",
    "HTTPSConnectionPool(host='{host}', port=443): Max retries exceeded with url: {path} "
    '(Caused by NameResolutionError("<urllib3.connection.HTTPSConnection object at 0x{address:x}>: '
    "Failed to resolve '{host}' ([Errno -2] Name or service not known)\"))",
)


class WebSearchTools:
    """The ``WebSearchAPI`` tools of one episode."""

    def __init__(
        self, backend: SearchBackend, *, show_snippet: bool, failure_rate: float = 0.0, seed: int = 0
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self._backend = backend
        self._show_snippet = show_snippet
        self._failure_rate = failure_rate
        self._failure_draw = random.Random(seed)
        self._failure_text = random.Random(seed + 1)

    def search_engine_query(self, keywords: str, max_results: int = 10, region: str = "wt-wt") -> Any:
        try:
            found = self._backend.search(keywords, region)
        except SearchError as exc:
            return {"error": str(exc)}
        if found is None:
            return {"error": "Failed to retrieve the search results from server. Please try again later."}
        results = []
        for result in found[: min(max_results, MAX_RESULTS_CAP)]:
            entry = {"title": result.get("title", ""), "href": result.get("link", "")}
            if self._show_snippet:
                entry["body"] = result.get("snippet", "")
            results.append(entry)
        return results

    def fetch_url_content(self, url: str, mode: str = "raw") -> dict[str, str]:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Invalid URL: {url}")
        try:
            page = self._backend.fetch(url)
            if self._failure_rate and self._failure_draw.random() < self._failure_rate:
                return {"error": self._injected_failure(url)}
            if mode == "raw":
                content = page.body
            elif mode == "markdown":
                content = html_to_markdown(page.body)
            elif mode == "truncate":
                content = html_to_text(page.body)
            else:
                raise ValueError(f"Unsupported mode: {mode}")
        except (FetchError, ValueError) as exc:
            return {"error": f"An error occurred while fetching {url}: {exc}"}
        if len(content) > MAX_CONTENT_CHARS:
            content = content[:MAX_CONTENT_CHARS] + f"\n[... cut at {MAX_CONTENT_CHARS} characters]"
        return {"content": content}

    def _injected_failure(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        template = self._failure_text.choice(_FAILURES)
        return template.format(
            url=url,
            host=parts.hostname or "unknown",
            path=parts.path or "/",
            address=self._failure_text.randrange(0x10000000, 0xFFFFFFFF),
        )
