"""Pure jnp custom ops (no Flax, no state): boxes, matching, NMS, RoIAlign/RoIPool, window attention, losses."""
