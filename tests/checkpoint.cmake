# Snapshots (#5): erasure coding (Reed-Solomon, rotating group layout, fragment checksums).
strata_add_test(checkpoint_test SOURCES checkpoint_test.cc DEPS strata_checkpoint LABELS checkpoint)
