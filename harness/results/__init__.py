"""Views of stored results: Markdown, HTML, JUnit, the regression gate, the release matrix."""
