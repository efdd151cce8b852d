"""`python -m fast_llm_supernet.fast_llm_adapter ARGS` = `fast-llm ARGS` with the supernet plugin registered.

For environments where the `.pth` start-up hook is not installed (a source checkout on PYTHONPATH, or
SUPERNET_FAST_LLM_PLUGIN=0): `python -m fast_llm_supernet.fast_llm_adapter train supernet -c X.yaml`.
"""

from fast_llm_supernet.fast_llm_adapter import register


def main() -> None:
    from fast_llm.cli import fast_llm_main

    register()
    fast_llm_main()


if __name__ == "__main__":
    main()
