"""Where web-search results and pages come from: live services, or a recording.

BFCL's ``WebSearchAPI`` hard-wires SerpAPI's DuckDuckGo engine and ``requests``. envtune separates the
tool (``web_search.py``: BFCL's result shapes, snippets, error texts, injected failures) from a
``SearchBackend`` that answers two questions, ``search`` and ``fetch``:

- ``SerpApiBackend``: SerpAPI's ``duckduckgo`` engine over HTTPS (a key and network needed), with a
  bounded number of rate-limit retries (BFCL retries forever).
- ``DuckDuckGoBackend``: the ``duckduckgo_search`` package, if the user installed it (the paper's runs).
- ``RecordedBackend``: offline replay of a ``WebRecording`` (exact queries first, then BM25+ ranking
  over the recorded pages), used by tests and offline evaluation.
- ``RecordingBackend``: wraps a live backend and writes what it saw to a recording file.

Live page fetches go through ``HttpFetcher``: http(s) only (redirects included), public addresses only
(no loopback, private or link-local hosts: a model picks the URLs), a byte limit and a timeout, so a
hostile URL costs bounded time and memory and reaches nothing local.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from envtune.environments.bfcl_v4.bm25 import Bm25PlusIndex

RECORDING_FORMAT = "envtune-web-recording/1"
MAX_PAGE_BYTES = 2 * 1024 * 1024
"""Largest page body a live fetch reads; the rest is cut (a page is text for a model, not a download)."""
MAX_RANKED_RESULTS = 10
_BROWSER_HEADERS = {
    "User-Agent": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120 Safari/537.36"
    ),
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en-US,en;q=0.9",
}
_SEARCH_WORD = re.compile(r"\w+")


class SearchError(RuntimeError):
    """The search service failed; ``str(exc)`` is what the tool reports."""


class FetchError(RuntimeError):
    """A page could not be fetched; ``str(exc)`` reads like a ``requests`` error."""


@dataclass(frozen=True, slots=True)
class Page:
    """A fetched page."""

    url: str
    """The final URL."""
    body: str
    """The decoded text (HTML for most pages)."""


class SearchBackend(Protocol):
    """The two things the web-search tools need from the outside world."""

    @property
    def name(self) -> str: ...

    def search(self, keywords: str, region: str) -> list[dict[str, Any]] | None:
        """Organic results (``title``, ``link``, ``snippet``), or None when the service gave none."""
        ...

    def fetch(self, url: str) -> Page:
        """The page at an http(s) URL; raises ``FetchError``."""
        ...


def normalise_url(url: str) -> str:
    """A URL without its fragment (``#:~:text=`` highlights in BFCL's annotations)."""
    return url.split("#", 1)[0]


def normalise_query(keywords: str) -> str:
    return " ".join(keywords.lower().split())


# --- live fetching -------------------------------------------------------------------------------


def check_public_host(url: str) -> None:
    """Refuse URLs whose host resolves to a loopback, private, link-local or reserved address.

    A model chooses the URLs it fetches; without this a live backend would let it probe the machine
    and its network (cloud metadata endpoints included). A name that does not resolve is left to the
    fetch itself (it fails there).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"Invalid URL {url!r}: only http(s) URLs with a host can be fetched")
    try:
        infos = socket.getaddrinfo(parts.hostname, None)
    except (socket.gaierror, UnicodeError):
        return
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global:
            raise FetchError(f"Refused to fetch {url}: {parts.hostname} is a non-public address ({address})")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise FetchError(f"Refused redirect from {req.full_url} to a non-http(s) URL")
        if not self.allow_private:
            check_public_host(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpFetcher:
    """GET a public http(s) URL with a timeout and a byte limit (``allow_private`` for local tests)."""

    def __init__(
        self, timeout_s: float = 20.0, max_bytes: int = MAX_PAGE_BYTES, *, allow_private: bool = False
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_private = allow_private
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects(allow_private))

    def fetch(self, url: str) -> Page:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"Invalid URL {url!r}: only http(s) URLs with a host can be fetched")
        if not self.allow_private:
            check_public_host(url)
        request = urllib.request.Request(url, headers=_BROWSER_HEADERS)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read(self.max_bytes)
                charset = response.headers.get_content_charset() or "utf-8"
                return Page(url=response.geturl(), body=raw.decode(charset, errors="replace"))
        except urllib.error.HTTPError as exc:
            kind = "Client" if exc.code < 500 else "Server"
            raise FetchError(f"{exc.code} {kind} Error: {exc.reason} for url: {url}") from None
        except (urllib.error.URLError, TimeoutError, OSError, LookupError) as exc:
            raise FetchError(f"{type(exc).__name__}: {exc} (url: {url})") from None


# --- live search ---------------------------------------------------------------------------------


class SerpApiBackend:
    """SerpAPI's DuckDuckGo engine, as BFCL queries it (``engine=duckduckgo``, ``q``, ``kl``)."""

    endpoint = "https://serpapi.com/search.json"

    def __init__(
        self,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        fetcher: HttpFetcher | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("SerpAPI needs an API key (BFCL reads it from SERPAPI_API_KEY)")
        self._key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._fetcher = fetcher or HttpFetcher()

    @property
    def name(self) -> str:
        return "serpapi-duckduckgo"

    def search(self, keywords: str, region: str) -> list[dict[str, Any]] | None:
        query = urllib.parse.urlencode(
            {"engine": "duckduckgo", "q": keywords, "kl": region, "api_key": self._key}
        )
        backoff = 2.0
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(f"{self.endpoint}?{query}", timeout=self.timeout_s) as response:
                    payload = json.loads(response.read(MAX_PAGE_BYTES))
            except urllib.error.HTTPError as exc:
                if exc.code == 429 and attempt < self.max_retries:
                    time.sleep(backoff)
                    backoff = min(2 * backoff, 60.0)
                    continue
                raise SearchError(f"{exc.code} error from SerpAPI: {exc.reason}") from None
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
                raise SearchError(str(exc)) from None
            error = payload.get("error") if isinstance(payload, dict) else "malformed response"
            if error and "429" in str(error) and attempt < self.max_retries:
                time.sleep(backoff)
                backoff = min(2 * backoff, 60.0)
                continue
            results = payload.get("organic_results") if isinstance(payload, dict) else None
            return results if isinstance(results, list) else None
        raise SearchError("SerpAPI kept answering 429 (rate limit); retries exhausted")

    def fetch(self, url: str) -> Page:
        return self._fetcher.fetch(url)


class DuckDuckGoBackend:
    """The ``duckduckgo_search`` package (imported on first use; not a dependency of envtune)."""

    def __init__(self, fetcher: HttpFetcher | None = None) -> None:
        self._fetcher = fetcher or HttpFetcher()

    @property
    def name(self) -> str:
        return "duckduckgo_search"

    def search(self, keywords: str, region: str) -> list[dict[str, Any]] | None:
        try:
            from duckduckgo_search import DDGS
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise SearchError("the duckduckgo backend needs `pip install duckduckgo_search`") from exc
        try:
            rows = DDGS().text(keywords, region=region, max_results=MAX_RANKED_RESULTS)
        except Exception as exc:  # pragma: no cover - network
            raise SearchError(str(exc)) from None
        return [
            {"title": r.get("title", ""), "link": r.get("href", ""), "snippet": r.get("body", "")}
            for r in rows
        ]

    def fetch(self, url: str) -> Page:
        return self._fetcher.fetch(url)


# --- recordings ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedPage:
    """One page of a recording."""

    url: str
    title: str
    snippet: str
    body: str


@dataclass(frozen=True, slots=True)
class WebRecording:
    """Recorded searches and pages; JSON file format ``envtune-web-recording/1``."""

    searches: Mapping[tuple[str, str], tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    """(normalised keywords, region) -> organic results, as the service returned them."""
    pages: Mapping[str, RecordedPage] = field(default_factory=dict)
    """Normalised URL -> page."""
    source: str = ""
    """Where the recording came from (shown in eval output)."""

    @staticmethod
    def load(path: Path) -> WebRecording:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("format") != RECORDING_FORMAT:
            raise ValueError(f"{path} is not an {RECORDING_FORMAT} file")
        searches = {
            (normalise_query(row["keywords"]), row.get("region", "wt-wt")): tuple(row["results"])
            for row in raw.get("searches", ())
        }
        pages = {
            normalise_url(row["url"]): RecordedPage(
                url=row["url"], title=row.get("title", ""), snippet=row.get("snippet", ""), body=row["body"]
            )
            for row in raw.get("pages", ())
        }
        return WebRecording(searches=searches, pages=pages, source=raw.get("source", str(path)))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORDING_FORMAT,
            "source": self.source,
            "searches": [
                {"keywords": keywords, "region": region, "results": [dict(r) for r in results]}
                for (keywords, region), results in self.searches.items()
            ],
            "pages": [
                {"url": p.url, "title": p.title, "snippet": p.snippet, "body": p.body}
                for p in self.pages.values()
            ],
        }


class RecordedBackend:
    """Offline replay: exact recorded queries, else the best BM25+ matches among recorded pages."""

    def __init__(self, recording: WebRecording) -> None:
        self.recording = recording
        self._pages = list(recording.pages.values())
        self._tokens = [_SEARCH_WORD.findall(f"{p.title} {p.snippet} {p.body}".lower()) for p in self._pages]
        self._index = Bm25PlusIndex(self._tokens) if self._tokens else None

    @property
    def name(self) -> str:
        return f"recorded:{self.recording.source}"

    def search(self, keywords: str, region: str) -> list[dict[str, Any]] | None:
        exact = self.recording.searches.get((normalise_query(keywords), region))
        if exact is not None:
            return [dict(result) for result in exact]
        query = _SEARCH_WORD.findall(keywords.lower())
        if self._index is None or not query:
            return []
        return [
            {"title": self._pages[i].title, "link": self._pages[i].url, "snippet": self._pages[i].snippet}
            for i in self._index.top(query, MAX_RANKED_RESULTS)
        ]

    def fetch(self, url: str) -> Page:
        page = self.recording.pages.get(normalise_url(url))
        if page is None:
            raise FetchError(f"404 Client Error: Not Found for url: {url}")
        return Page(url=page.url, body=page.body)


class RecordingBackend:
    """A live backend whose answers are also written to a recording file (on ``save``)."""

    def __init__(self, inner: SearchBackend, path: Path) -> None:
        self._inner = inner
        self._path = Path(path)
        self._lock = threading.Lock()
        self._searches: dict[tuple[str, str], tuple[Mapping[str, Any], ...]] = {}
        self._pages: dict[str, RecordedPage] = {}

    @property
    def name(self) -> str:
        return f"recording:{self._inner.name}"

    def search(self, keywords: str, region: str) -> list[dict[str, Any]] | None:
        results = self._inner.search(keywords, region)
        if results is not None:
            with self._lock:
                self._searches[(normalise_query(keywords), region)] = tuple(dict(r) for r in results)
        return results

    def fetch(self, url: str) -> Page:
        page = self._inner.fetch(url)
        with self._lock:
            self._pages[normalise_url(url)] = RecordedPage(url=url, title="", snippet="", body=page.body)
        return page

    def save(self) -> Path:
        with self._lock:
            recording = WebRecording(dict(self._searches), dict(self._pages), source=self._inner.name)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_text(json.dumps(recording.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        return self._path


def annotation_recording(hops: Iterable[tuple[str, Sequence[Mapping[str, Any]]]]) -> WebRecording:
    """An offline corpus written by envtune from BFCL's per-hop annotations (no web content in it).

    Each annotated source URL becomes one page whose text states the hop's sub-question and answer,
    so a model that searches for the sub-questions and reads the pages can answer offline. It tests
    the environment and the protocol, not a model's skill on the live web.
    """
    by_url: dict[str, list[tuple[str, str]]] = {}
    urls: dict[str, str] = {}
    for _, task_hops in hops:
        for hop in task_hops:
            url = normalise_url(str(hop.get("source", "")))
            if not url.startswith(("http://", "https://")):
                continue
            urls.setdefault(url, url)
            pair = (str(hop.get("subquestion", "")), str(hop.get("answer", "")))
            if pair not in by_url.setdefault(url, []):
                by_url[url].append(pair)
    pages = {}
    for url, facts in by_url.items():
        title = facts[0][0]
        paragraphs = "".join(f"<h2>{q}</h2><p>Answer: {a}.</p>" for q, a in facts)
        body = (
            f"<html><head><title>{title}</title></head><body><h1>{title}</h1>{paragraphs}"
            "<p><small>Offline page written by envtune from BFCL's answer annotations.</small></p>"
            "</body></html>"
        )
        pages[url] = RecordedPage(url=urls[url], title=title, snippet=f"{title}: {facts[0][1]}.", body=body)
    return WebRecording(searches={}, pages=pages, source="bfcl-v4-annotations")
