import os

# Two CI cores shared by up to four ranks: oversubscribed intra-op threads only slow things down.
os.environ.setdefault("OMP_NUM_THREADS", "1")
