"""Key indexes over a decode cache: the coarse block (page min/max, Quest) index and the fine
cluster (k-means, cluster-ordered blocks) index."""

from alaya_jax.index.block import (BlockConfig, BlockIndex, append_block_index,
                                   build_block_index, page_upper_bounds)
from alaya_jax.index.cluster import (ClusterConfig, ClusterIndex, Selection, build_cluster_index,
                                     centroid_scores, fold_tail, gathered_attention,
                                     remainder_estimate, select_blocks)
