"""Applications built only on bilevel's public API; each module has ``main(argv) -> int``."""
