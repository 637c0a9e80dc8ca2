# Snapshots (#5): erasure coding (Reed-Solomon, rotating group layout, fragment checksums).
strata_add_test(checkpoint_test SOURCES checkpoint_test.cc DEPS strata_checkpoint LABELS checkpoint)
# Snapshots (#5): snapshotd + SnapshotClient (shared-memory slots, commit, persistence, crashes).
strata_add_test(snapshot_test SOURCES snapshot_test.cc DEPS strata_checkpoint LABELS checkpoint)
# The EnsureSnapshotd race test starts the real `strata snapshotd` (skipped when not built).
target_compile_definitions(snapshot_test PRIVATE STRATA_BINARY="$<TARGET_FILE:strata>")
# Snapshots (#5): erasure coding across nodes (several snapshotds over TCP on 127.0.0.1).
strata_add_test(snapshot_ec_test SOURCES snapshot_ec_test.cc DEPS strata_checkpoint
                LABELS checkpoint)
