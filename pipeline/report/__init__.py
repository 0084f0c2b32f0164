"""The results page: section builders, the published numbers beside them, HTML and Markdown rendering."""
