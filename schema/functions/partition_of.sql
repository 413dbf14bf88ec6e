-- whizbang: the stable stream -> partition hash, the same function as
-- whizbang::routing::partition_of (FNV-1a 64-bit over the UTF-8 bytes, modulo the partition
-- count), for operators' queries. The runtime computes partitions itself and never calls it.
CREATE OR REPLACE FUNCTION {{schema}}.wb_partition_of(p_stream text, p_count integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    h numeric := 14695981039346656037;
    b integer;
    bytes bytea := convert_to(p_stream, 'UTF8');
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        b := get_byte(bytes, i);
        -- xor of the low byte, then multiply modulo 2^64 (numeric avoids bigint overflow).
        h := h - mod(h, 256) + (mod(h, 256)::integer # b);
        h := mod(h * 1099511628211, 18446744073709551616);
    END LOOP;
    RETURN mod(h, p_count)::integer;
END;
$$;
