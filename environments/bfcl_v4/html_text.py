"""Page text for ``fetch_url_content``'s ``truncate`` and ``markdown`` modes, with the stdlib parser.

BFCL uses BeautifulSoup (``truncate``: text without scripts and styles, one stripped line per text
node) and html2text (``markdown``). envtune's ``truncate`` follows the same rule with
``html.parser``; ``markdown`` uses html2text when it is installed, and otherwise a small converter
(headings, paragraphs, list items, links) that is close but not byte-identical.
"""

from __future__ import annotations

from html.parser import HTMLParser

_SKIPPED = frozenset({"script", "style"})
_BLOCKS = frozenset({"p", "div", "br", "tr", "section", "article", "header", "footer", "ul", "ol", "table"})
MAX_TEXT_NODES = 200_000
"""A page with more text nodes is cut there (bounded work on a hostile page)."""


class _TextCollector(HTMLParser):
    def __init__(self, markdown: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.markdown = markdown
        self.parts: list[str] = []
        self._skip_depth = 0
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skip_depth += 1
        elif self.markdown:
            if len(tag) == 2 and tag[0] == "h" and tag[1].isdigit():
                self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
            elif tag == "li":
                self.parts.append("\n  * ")
            elif tag in _BLOCKS:
                self.parts.append("\n\n")
            elif tag == "a":
                self._href = dict(attrs).get("href")
                self.parts.append("[")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif self.markdown and tag == "a":
            self.parts.append(f"]({self._href})" if self._href else "]")
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._skip_depth or len(self.parts) >= MAX_TEXT_NODES:
            return
        if self.markdown:
            self.parts.append(" ".join(data.split()))
        elif data.strip():
            self.parts.append(data.strip())


def html_to_text(html: str) -> str:
    """Text nodes outside scripts and styles, stripped, one per line (BeautifulSoup's ``get_text``)."""
    collector = _TextCollector(markdown=False)
    collector.feed(html)
    collector.close()
    return "\n".join(collector.parts)


def html_to_markdown(html: str) -> str:
    """Markdown of a page: html2text when installed, else envtune's small converter."""
    try:
        import html2text
    except ImportError:
        collector = _TextCollector(markdown=True)
        collector.feed(html)
        collector.close()
        lines = [line.rstrip() for line in "".join(collector.parts).splitlines()]
        text = "\n".join(lines)
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
        return text.strip() + "\n"
    return html2text.HTML2Text().handle(html)
