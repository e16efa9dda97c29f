-- Headers of an endpoint's own, sent with every delivery to it (`headers` of /api/endpoints,
-- src/endpoint_headers.rs): each element one header as sent, `name: value` (a name is an HTTP
-- token, so the first ": " ends it). Checked when set through the API, and again when a node
-- loads the endpoint: a line that is not one an endpoint may send is left out, never sent.
--
-- Only added, with a constant default (no table rewrite): an older node during a rolling upgrade
-- neither reads nor writes it, and sends its deliveries without these headers until it is
-- upgraded.
ALTER TABLE endpoints ADD COLUMN headers text[] NOT NULL DEFAULT '{}';
