"""Make a registered version the champion, whatever its score: the explicit act a `challenger` that cannot be compared
with the champion (other data, another evaluation protocol) needs.

    python -m pipelines.promote 7      # version 7 of mlflow.model_name becomes @champion
"""

import argparse

from pipelines.common import ROOT, read_params, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="the registered version to make the champion")
    args = parser.parse_args()
    params = read_params()
    from selfsup.tracking import promote

    before = promote(params.mlflow, ROOT, args.version)
    was = f" (it replaces version {before})" if before and before != args.version else ""
    print(f"{params.mlflow.model_name} version {args.version} is now @champion{was}")


if __name__ == "__main__":
    run_stage(main)
