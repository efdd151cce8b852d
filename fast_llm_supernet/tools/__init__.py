"""Command-line tools: teacher conversion (`convert`, `supernet-convert`) and the tiny teacher that tests and
examples use (`tiny_teacher`, `supernet-make-tiny-teacher`)."""
