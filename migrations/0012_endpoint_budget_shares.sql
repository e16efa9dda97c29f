-- Endpoint rate limits shared by the nodes that spend from the bucket, not viewed whole by each.
--
-- Before, every node's view of an endpoint's bucket was the whole balance, refilling at the whole
-- rate, and each node reserved its waiting deliveries' turns at that rate: N nodes that came to
-- an endpoint at the same moment (a backlog after a resume, a burst after a quiet minute) each
-- sent a second's worth at once and then the rate, and the cluster paid it back later by sending
-- nothing. Now each row also names the nodes that reported it within the last second, what each
-- wants (the deliveries it holds for the endpoint, up to a second's worth), its part of the rate
-- and what it was promised (`nodes`: {"<node>": [seen, granted, part, wants]}, seen in Unix
-- seconds). A node's part of the rate is the rate shared in proportion to what the nodes want;
-- a report, under the row's lock, gives it a view of at most that part of a positive balance,
-- and never what another node was promised and may still spend (its grant and its part's refill
-- since): so the views of the nodes together never hold more than the bucket, whenever each
-- came. A debt is shared in the same proportion, so every node is out of it when the bucket is.
-- The node's view refills at its part, and it paces the turns it reserves at its part.
--
-- Only added: an older node's report (0011's statement) leaves `nodes` as it is; it is not
-- counted, and spends from a view of the whole balance, as before.
ALTER TABLE endpoint_budgets ADD COLUMN nodes jsonb NOT NULL DEFAULT '{}';

-- One report of node `node`: what each endpoint (`eps`, of organization `orgs`, at `rates` a
-- second) spent since its last report (`spent`; negative: turns given back) and how many
-- deliveries the node wants to send it (`wants`, at least 1). Each bucket is refilled for the
-- time since it was last touched (up to one second's worth), the spend taken off (down to minus
-- a minute's worth). Rows are locked in endpoint order, so two nodes reporting the same endpoints
-- never deadlock. Returns, per endpoint, the node's view and its part of the rate.
CREATE FUNCTION triggers_endpoint_budget_report(
    node uuid, eps uuid[], orgs uuid[], rates int4[], spent int4[], wants int4[])
RETURNS TABLE (ep uuid, view_tokens float8, part float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    at_ts   timestamptz := clock_timestamp();
    at_s    float8 := extract(epoch FROM clock_timestamp());
    me      text := node::text;
    i       int;
    r       float8;
    w       float8;
    cur     endpoint_budgets%ROWTYPE;
    t       float8;
    live    jsonb;
    others  float8;
    wanted  float8;
    share   float8;
    granted float8;
BEGIN
    FOR i IN SELECT u.ord FROM unnest(eps) WITH ORDINALITY AS u(id, ord) ORDER BY u.id LOOP
        r := greatest(rates[i], 1);
        w := least(greatest(wants[i], 1), r);
        SELECT * INTO cur FROM endpoint_budgets b
            WHERE b.endpoint_id = eps[i] AND b.org_id = orgs[i] FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO endpoint_budgets (endpoint_id, org_id, rate, tokens, updated_at)
                VALUES (eps[i], orgs[i], r, r, at_ts)
                ON CONFLICT (endpoint_id, org_id) DO NOTHING;
            SELECT * INTO cur FROM endpoint_budgets b
                WHERE b.endpoint_id = eps[i] AND b.org_id = orgs[i] FOR UPDATE;
        END IF;
        t := least(r, cur.tokens
                      + greatest(0, extract(epoch FROM at_ts - cur.updated_at)) * r);
        t := least(r, greatest(-60.0 * r, t - spent[i]));
        -- The other nodes heard from within the last second: what they may still spend of what
        -- they were promised (their grants, and their parts' refill since), and what they want.
        SELECT coalesce(jsonb_object_agg(e.k, e.v), '{}'::jsonb),
               coalesce(sum((e.v->>1)::float8
                            + (e.v->>2)::float8 * greatest(0, at_s - (e.v->>0)::float8)), 0),
               coalesce(sum((e.v->>3)::float8), 0)
            INTO live, others, wanted
            FROM jsonb_each(cur.nodes) AS e(k, v)
            WHERE e.k <> me AND (e.v->>0)::float8 > at_s - 1.0;
        share := w / (w + wanted);
        IF t > 0 THEN
            granted := greatest(0, least(t - others, t * share));
            view_tokens := granted;
        ELSE
            granted := 0;
            view_tokens := t * share;
        END IF;
        part := r * share;
        UPDATE endpoint_budgets b
            SET tokens = t, rate = r, updated_at = at_ts,
                nodes = live || jsonb_build_object(me, jsonb_build_array(at_s, granted, part, w))
            WHERE b.endpoint_id = eps[i] AND b.org_id = orgs[i];
        ep := eps[i];
        RETURN NEXT;
    END LOOP;
END
$$;
