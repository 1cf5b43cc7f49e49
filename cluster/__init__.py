"""Ray side of memdist: shard actors, placement and cluster launch (imported as memdist.cluster)."""
