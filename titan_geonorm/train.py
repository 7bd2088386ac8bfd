"""`python -m titan_geonorm.train --job.config_file X.toml [--section.key value ...]`.

The entry point; the launcher itself is `titan_geonorm.titan.launcher`.
"""

from titan_geonorm.titan.launcher import main

if __name__ == "__main__":
    main()
