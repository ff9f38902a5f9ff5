"""Train and test BlossomRec on a RecBole dataset with the example config.

    python examples/recbole/run.py --dataset=ml-100k
    python examples/recbole/run.py --dataset=ml-1m --attention=dense \
        --eval_args="{'split': {'LS': 'valid_and_test'}, 'order': 'TO', 'group_by': 'user', 'mode': 'full'}"

RecBole downloads its named datasets into ``--data_path`` (default ``dataset/``) on first use; a local
dataset is a folder ``<data_path>/<name>/`` with ``<name>.inter``. Every ``--key=value`` overrides the
config file (RecBole reads them from the command line itself, so write them with ``=``). A dict-valued
key replaces the file's whole dict: ``--eval_args="{'mode': 'full'}"`` alone would drop the
leave-one-out split and time order of the example config for RecBole's defaults (a random 80/10/10
split), so give every entry, as above, to change only the ranking mode.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from blossomrec_cuda.rec.recbole_adapter import run_blossomrec

EXAMPLE_CONFIG = Path(__file__).resolve().with_name("blossomrec.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="other --key=value pairs: RecBole config overrides")
    parser.add_argument("--dataset", default="ml-100k", help="RecBole dataset name")
    parser.add_argument("--config_files", default=str(EXAMPLE_CONFIG),
                        help="comma-separated yaml files, later ones override earlier ones")
    args, _ = parser.parse_known_args()  # the rest are RecBole's --key=value overrides
    result = run_blossomrec(dataset=args.dataset, config_file_list=args.config_files.split(","))
    for name, value in result["test_result"].items():
        print(f"test {name}: {value:.4f}")


if __name__ == "__main__":
    main()
