"""Data: the synthetic MUSE-layout corpus generator (`corpus`) and the MUSE directory loader (`muse`)."""
