-- invsync cloud contract, part 1: the tables, the web-edit trigger and the two bridge
-- functions. Runs unmodified on a Supabase project (SQL editor or `invsync cloud migrate`)
-- and on plain PostgreSQL 15+. Part 2 (002_access.sql) decides who may call and read what.
--
-- Clocks: every field carries the hybrid logical clock (HLC) of the write that set it, an
-- integer below 2**53 (milliseconds << 11 | counter), compared as bigint. A field only ever
-- moves to a strictly greater (hlc, writer), so replayed and stale batches change nothing
-- and several bridges pushing at once converge.
--
-- Errors the bridge functions raise, by SQLSTATE (the bridge decides what to do by class):
-- * 21xxx, 22xxx, 23xxx, 54xxx: a row of the batch is bad (a value a constraint refuses,
--   23514; a malformed value, 22P02; an item of another fleet, 23514). The bridge halves
--   the batch until the bad row is alone and parks it.
-- * 42501 (insufficient_privilege): the caller may not act for this fleet.
-- * P0001 (raise_exception): the request as a whole is malformed (no fleet, `items` or
--   `movements` not arrays). No row is at fault, so none may be parked: the bridge backs
--   off and retries, and reports the message.
-- Web writes the stations would refuse fail with 23514 and a message naming the field.

create schema if not exists invsync_private;

-- A UUIDv7 (the only item id form a station accepts) for rows the web app inserts:
-- 48 bits of milliseconds over a random v4, version nibble forced to 7.
create or replace function invsync_private.uuid7()
returns uuid
language sql
volatile
set search_path = ''
as $$
  select encode(
    pg_catalog.set_bit(
      pg_catalog.set_bit(
        overlay(
          pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
          placing substring(
            pg_catalog.int8send(
              pg_catalog.floor(extract(epoch from pg_catalog.clock_timestamp()) * 1000)::bigint
            ) from 3)
          from 1 for 6),
        52, 1),
      53, 1),
    'hex')::uuid
$$;

-- The fleet a Supabase user belongs to: app_metadata is writable only with the service
-- key, so a user cannot move themselves to another fleet. Reads the same setting as
-- Supabase's auth.jwt() without needing its `auth` schema (plain Postgres has none).
create or replace function invsync_private.jwt_claims()
returns jsonb
language sql
stable
set search_path = ''
as $$
  select coalesce(
    nullif(pg_catalog.current_setting('request.jwt.claims', true), ''),
    nullif(pg_catalog.current_setting('request.jwt.claim', true), '')
  )::jsonb
$$;

create or replace function invsync_private.jwt_fleet()
returns text
language sql
stable
set search_path = ''
as $$
  select invsync_private.jwt_claims() -> 'app_metadata' ->> 'fleet'
$$;

-- A server HLC: wall milliseconds from the server clock, but always above `floor` so a web
-- edit wins over every write its author could have seen.
create or replace function invsync_private.server_hlc(floor bigint)
returns bigint
language sql
volatile
set search_path = ''
as $$
  select greatest(
    pg_catalog.floor(extract(epoch from pg_catalog.clock_timestamp()) * 1000)::bigint << 11,
    floor + 1
  )
$$;

create table public.inventory_items (
  -- Constraint names are what a web app shows in its error message: they say the rule.
  id uuid primary key default invsync_private.uuid7()
    constraint "id must be a UUIDv7 (leave it out to get one)"
    check (substr(id::text, 15, 1) = '7' and substr(id::text, 20, 1) in ('8', '9', 'a', 'b')),
  fleet text not null default invsync_private.jwt_fleet()
    constraint "fleet must be 1-64 characters" check (length(fleet) between 1 and 64),
  barcode text not null default ''
    constraint "barcode: 1-64 printable ASCII characters, no spaces"
    check (barcode = '' or barcode ~ '^[!-~]{1,64}$'),
  barcode_hlc bigint not null default 0,
  barcode_writer text not null default '',
  name text not null default ''
    constraint "name must be at most 200 characters" check (length(name) <= 200),
  name_hlc bigint not null default 0,
  name_writer text not null default '',
  kind text not null default 'bulk'
    constraint "kind must be bulk or serial" check (kind in ('bulk', 'serial')),
  kind_hlc bigint not null default 0,
  kind_writer text not null default '',
  location text not null default ''
    constraint "location must be at most 100 characters" check (length(location) <= 100),
  location_hlc bigint not null default 0,
  location_writer text not null default '',
  category text not null default ''
    constraint "category must be at most 100 characters" check (length(category) <= 100),
  category_hlc bigint not null default 0,
  category_writer text not null default '',
  notes text not null default ''
    constraint "notes must be at most 2000 characters" check (length(notes) <= 2000),
  notes_hlc bigint not null default 0,
  notes_writer text not null default '',
  status text not null default 'in'
    constraint "status must be in, out, repair or lost"
    check (status in ('in', 'out', 'repair', 'lost')),
  status_hlc bigint not null default 0,
  status_writer text not null default '',
  sheet text
    constraint "sheet must be null or 1-64 characters"
    check (sheet is null or length(sheet) between 1 and 64),
  sheet_hlc bigint not null default 0,
  sheet_writer text not null default '',
  deleted boolean not null default false,
  deleted_hlc bigint not null default 0,
  deleted_writer text not null default '',
  stock integer not null default 0
    constraint "stock must be within +-1000000000"
    check (stock between -1000000000 and 1000000000),
  -- Which pushed stock is the more complete view: (stock_kind_hlc, stock_version). The
  -- version (the sum of the counter slot HLCs for bulk, the status HLC for a serialized
  -- unit) only grows under one kind, so the HLC of the `kind` the pushing view had comes
  -- first: a kind change makes any version of the new kind newer.
  stock_version bigint not null default 0,
  stock_kind_hlc bigint not null default 0,
  -- The HLC of the last web edit of stock (its change log entry carries it). Part of the
  -- floor of the next web edit's HLC, so every web edit of a row is newer than the last.
  stock_web_hlc bigint not null default 0,
  updated_at timestamptz not null default now(),
  -- 'station:<id>' for the bridge, 'web' for everyone else.
  origin text not null default 'web' check (length(origin) <= 80)
);

create index inventory_items_fleet on public.inventory_items (fleet);

create table public.inventory_movements (
  id text primary key check (length(id) between 1 and 64),
  fleet text not null check (length(fleet) between 1 and 64),
  hlc bigint not null,
  station text not null check (length(station) <= 64),
  operator text not null check (length(operator) <= 200),
  item_id uuid not null,
  barcode text not null check (length(barcode) <= 64),
  op text not null check (length(op) between 1 and 32),
  qty integer not null,
  sheet text check (sheet is null or length(sheet) <= 64),
  recorded_at timestamptz not null default now()
);

create index inventory_movements_fleet_item on public.inventory_movements (fleet, item_id);

-- The change log of web edits that pull_changes reads. `txid` is the writing transaction:
-- a reader only returns rows below its snapshot's xmin, which no running transaction can
-- still add to, so a late-committing edit is never skipped (see pull_changes).
create table public.inventory_changes (
  change_id bigint generated always as identity primary key,
  txid xid8 not null default pg_current_xact_id(),
  fleet text not null,
  item_id uuid not null,
  fields jsonb not null,
  recorded_at timestamptz not null default now()
);

create index inventory_changes_fleet_txid on public.inventory_changes (fleet, txid, change_id);

-- Which database this is: a random id written once, when the migrations first run. A
-- database restored from a backup or made again at the same URL has another id (or a
-- transaction counter below the bridge's cursor), so a bridge can tell it is not the
-- database it pushed to and pulled from (see pull_changes).
create table invsync_private.database_instance (
  only_row boolean primary key default true check (only_row),
  id uuid not null default pg_catalog.gen_random_uuid(),
  created_at timestamptz not null default now()
);

insert into invsync_private.database_instance default values;

create or replace function public.invsync_database_id()
returns uuid
language sql
stable
security definer
set search_path = ''
as $$
  select d.id from invsync_private.database_instance d
$$;

-- Whether a write comes from merge_inventory. The transaction-local setting alone proves
-- nothing (any session may set it), so the write must also run as a role that may grant
-- UPDATE on the table: its owner, which merge_inventory (SECURITY DEFINER) runs as and a
-- web user's session never is (nor is anyone the owner did not trust with grant options,
-- except superusers). Called from the triggers' WHEN clauses, so it runs as the writing
-- user: every role may execute it (002_access.sql). No SET search_path (every name is
-- qualified, operators too): it must stay inlinable, as a function call per row and
-- trigger would make a push of many rows several times slower.
create or replace function invsync_private.bridge_writing()
returns boolean
language sql
stable
as $$
  select coalesce(
      pg_catalog.current_setting('invsync.bridge', true) operator(pg_catalog.=) 'on', false)
    and pg_catalog.has_table_privilege(
      'public.inventory_items'::pg_catalog.regclass, 'UPDATE WITH GRANT OPTION')
$$;

-- Web edits (web app, SQL editor, anyone but the bridge), before the row is written:
-- stamp each changed field with a server HLC above every HLC in the row and mark the row
-- as the web's. Nothing is logged here: for INSERT .. ON CONFLICT (what supabase-js's
-- upsert() sends) this runs for the proposed row before the conflict is known, and that
-- row may never be written (log_web_edit logs what was).
create or replace function invsync_private.stamp_web_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  hlc bigint;
  changed boolean := false;
begin
  if tg_op = 'INSERT' then
    hlc := invsync_private.server_hlc(0);
    new.barcode_hlc := hlc; new.barcode_writer := 'cloud';
    new.name_hlc := hlc; new.name_writer := 'cloud';
    new.kind_hlc := hlc; new.kind_writer := 'cloud';
    new.location_hlc := hlc; new.location_writer := 'cloud';
    new.category_hlc := hlc; new.category_writer := 'cloud';
    new.notes_hlc := hlc; new.notes_writer := 'cloud';
    new.status_hlc := hlc; new.status_writer := 'cloud';
    new.sheet_hlc := hlc; new.sheet_writer := 'cloud';
    new.deleted_hlc := hlc; new.deleted_writer := 'cloud';
    new.stock_version := 0;
    new.stock_kind_hlc := 0;
    new.stock_web_hlc := hlc;
    new.origin := 'web';
    new.updated_at := now();
    return new;
  end if;
  if new.id is distinct from old.id or new.fleet is distinct from old.fleet then
    raise exception 'an item keeps its id and fleet'
      using errcode = 'check_violation';
  end if;
  hlc := invsync_private.server_hlc(greatest(
    old.barcode_hlc, old.name_hlc, old.kind_hlc, old.location_hlc, old.category_hlc,
    old.notes_hlc, old.status_hlc, old.sheet_hlc, old.deleted_hlc, old.stock_web_hlc));
  -- Clock columns are the bridge's: a web write to them is ignored.
  new.barcode_hlc := old.barcode_hlc; new.barcode_writer := old.barcode_writer;
  new.name_hlc := old.name_hlc; new.name_writer := old.name_writer;
  new.kind_hlc := old.kind_hlc; new.kind_writer := old.kind_writer;
  new.location_hlc := old.location_hlc; new.location_writer := old.location_writer;
  new.category_hlc := old.category_hlc; new.category_writer := old.category_writer;
  new.notes_hlc := old.notes_hlc; new.notes_writer := old.notes_writer;
  new.status_hlc := old.status_hlc; new.status_writer := old.status_writer;
  new.sheet_hlc := old.sheet_hlc; new.sheet_writer := old.sheet_writer;
  new.deleted_hlc := old.deleted_hlc; new.deleted_writer := old.deleted_writer;
  new.stock_version := old.stock_version;
  new.stock_kind_hlc := old.stock_kind_hlc;
  new.stock_web_hlc := old.stock_web_hlc;
  if new.barcode is distinct from old.barcode then
    new.barcode_hlc := hlc; new.barcode_writer := 'cloud'; changed := true;
  end if;
  if new.name is distinct from old.name then
    new.name_hlc := hlc; new.name_writer := 'cloud'; changed := true;
  end if;
  if new.kind is distinct from old.kind then
    new.kind_hlc := hlc; new.kind_writer := 'cloud'; changed := true;
  end if;
  if new.location is distinct from old.location then
    new.location_hlc := hlc; new.location_writer := 'cloud'; changed := true;
  end if;
  if new.category is distinct from old.category then
    new.category_hlc := hlc; new.category_writer := 'cloud'; changed := true;
  end if;
  if new.notes is distinct from old.notes then
    new.notes_hlc := hlc; new.notes_writer := 'cloud'; changed := true;
  end if;
  if new.status is distinct from old.status then
    new.status_hlc := hlc; new.status_writer := 'cloud'; changed := true;
  end if;
  if new.sheet is distinct from old.sheet then
    new.sheet_hlc := hlc; new.sheet_writer := 'cloud'; changed := true;
  end if;
  if new.deleted is distinct from old.deleted then
    new.deleted_hlc := hlc; new.deleted_writer := 'cloud'; changed := true;
  end if;
  -- Stock stays a counter on the stations: a web edit of it is a count, applied there
  -- as the difference from the stock the cloud showed (logged with it, so every station
  -- adds the same amount). stock_version is left alone, so the next push of a station
  -- that has applied the count replaces this value with the merged one.
  if new.stock is distinct from old.stock then
    new.stock_web_hlc := hlc; changed := true;
  end if;
  if changed then
    new.origin := 'web';
    new.updated_at := now();
  else
    new.origin := old.origin;
    new.updated_at := old.updated_at;
  end if;
  return new;
end
$$;

-- A web value the stations would refuse (crdt_store.model.check_field and the stock
-- bounds of a count) fails here, as the web app's error, rather than reaching the
-- stations, which would ignore it and never agree with the table again. The rules the
-- table's CHECK constraints already hold for every writer (lengths, kind, status, id) are
-- not repeated.
create or replace function invsync_private.check_web_value(field text, value jsonb)
returns void
language plpgsql
immutable
set search_path = ''
as $$
declare
  given text := value #>> '{}';
  -- Python's str.strip() removes what str.isspace() calls whitespace: these.
  whitespace constant text := pg_catalog.chr(9) || pg_catalog.chr(10) || pg_catalog.chr(11)
    || pg_catalog.chr(12) || pg_catalog.chr(13) || pg_catalog.chr(28) || pg_catalog.chr(29)
    || pg_catalog.chr(30) || pg_catalog.chr(31) || ' ' || pg_catalog.chr(133)
    || pg_catalog.chr(160) || pg_catalog.chr(5760) || pg_catalog.chr(8192)
    || pg_catalog.chr(8193) || pg_catalog.chr(8194) || pg_catalog.chr(8195)
    || pg_catalog.chr(8196) || pg_catalog.chr(8197) || pg_catalog.chr(8198)
    || pg_catalog.chr(8199) || pg_catalog.chr(8200) || pg_catalog.chr(8201)
    || pg_catalog.chr(8202) || pg_catalog.chr(8232) || pg_catalog.chr(8233)
    || pg_catalog.chr(8239) || pg_catalog.chr(8287) || pg_catalog.chr(12288);
  -- Unicode category Cc (U+0001-U+001F, U+007F-U+009F); notes may hold tabs and newlines.
  control constant text := '[' || pg_catalog.chr(1) || '-' || pg_catalog.chr(8)
    || pg_catalog.chr(11) || '-' || pg_catalog.chr(31)
    || pg_catalog.chr(127) || '-' || pg_catalog.chr(159) || ']';
  tab_newline constant text := '[' || pg_catalog.chr(9) || pg_catalog.chr(10) || ']';
  problem text;
begin
  if field = 'barcode' then
    if given is null or given !~ '^[!-~]{1,64}$' then
      problem := 'must be 1-64 printable ASCII characters, no spaces';
    end if;
  elsif field = 'stock' then
    if jsonb_typeof(value) is distinct from 'number'
        or (value #>> '{}')::numeric not between 0 and 1000000000 then
      problem := 'must be a count between 0 and 1000000000';
    end if;
  elsif field in ('name', 'location', 'category', 'notes', 'sheet') and given is not null then
    if pg_catalog.btrim(given, whitespace) = '' and field in ('name', 'sheet') then
      problem := 'must not be empty';
    elsif given <> pg_catalog.btrim(given, whitespace) then
      problem := 'must not start or end with spaces';
    elsif given ~ control or (field <> 'notes' and given ~ tab_newline) then
      problem := case when field = 'notes'
        then 'must not contain control characters other than tabs and line breaks'
        else 'must not contain control characters (tabs and line breaks included)' end;
    end if;
  end if;
  if problem is not null then
    raise exception '% %', field, problem
      using errcode = 'check_violation', schema = 'public', table = 'inventory_items',
        column = field;
  end if;
end
$$;

-- Web edits, after the row is written (and only if it was: an upsert that updated the row
-- comes here as an UPDATE, one that did nothing not at all): refuse values the stations
-- would not take, then log what really changed, each field with its stamped HLC.
--   fields = {field: [value, hlc]}, and for stock [value, hlc, stock before] (0 for a new
--   row): a count, applied at the stations as the difference.
create or replace function invsync_private.log_web_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  now_row jsonb := to_jsonb(new);
  was_row jsonb := case when tg_op = 'UPDATE' then to_jsonb(old) end;
  field text;
  changed jsonb := '{}';
begin
  foreach field in array array[
    'barcode', 'name', 'kind', 'location', 'category', 'notes', 'status', 'sheet', 'deleted'
  ] loop
    if was_row is null or (now_row -> field) is distinct from (was_row -> field) then
      perform invsync_private.check_web_value(field, now_row -> field);
      changed := changed || jsonb_build_object(
        field, jsonb_build_array(now_row -> field, now_row -> (field || '_hlc')));
    end if;
  end loop;
  if was_row is null or (now_row -> 'stock') is distinct from (was_row -> 'stock') then
    perform invsync_private.check_web_value('stock', now_row -> 'stock');
    changed := changed || jsonb_build_object('stock', jsonb_build_array(
      new.stock, new.stock_web_hlc, coalesce((was_row ->> 'stock')::integer, 0)));
  end if;
  if changed <> '{}' then
    insert into public.inventory_changes (fleet, item_id, fields)
    values (new.fleet, new.id, changed);
  end if;
  return null;
end
$$;

-- The bridge's own writes (merge_inventory) call neither function.
create trigger inventory_items_web_edit
before insert or update on public.inventory_items
for each row
when (invsync_private.bridge_writing() is not true)
execute function invsync_private.stamp_web_edit();

create trigger inventory_items_web_log
after insert or update on public.inventory_items
for each row
when (invsync_private.bridge_writing() is not true)
execute function invsync_private.log_web_edit();

-- Who may act for `fleet`: a Supabase *station* user (JWT claims) only for the fleet in
-- its app_metadata, and only if app_metadata marks it as a station ("invsync_station":
-- true), so a web user of the fleet cannot push made-up clocks; the service role for any;
-- a direct connection only as a member of invsync_bridge (role created in 002_access.sql).
-- Raises P0001 without a fleet, 42501 for a caller that may not act for it.
create or replace function invsync_private.check_caller(fleet text)
returns void
language plpgsql
stable
set search_path = ''
as $$
declare
  claims jsonb := invsync_private.jwt_claims();
begin
  if fleet is null or length(fleet) not between 1 and 64 then
    -- P0001, not a data error: the whole request is wrong, no row of it (header).
    raise exception 'invsync: the request needs a fleet (1-64 characters)'
      using errcode = 'raise_exception';
  end if;
  if claims is not null and claims ->> 'role' is not null then
    if claims ->> 'role' = 'service_role' then
      return;
    end if;
    if claims ->> 'role' = 'authenticated'
        and (claims -> 'app_metadata' ->> 'fleet') = fleet
        and (claims -> 'app_metadata' ->> 'invsync_station') = 'true' then
      return;
    end if;
    raise exception 'this user may not act for fleet %', fleet
      using errcode = 'insufficient_privilege';
  end if;
  if not pg_catalog.pg_has_role(session_user, 'invsync_bridge', 'MEMBER') then
    raise exception 'role % is not a member of invsync_bridge', session_user
      using errcode = 'insufficient_privilege';
  end if;
end
$$;

-- The items of a push batch as rows. A field absent from the batch comes in with HLC 0
-- (never newer than what is stored) and the column's default (used only for a new row).
-- `rn` numbers repeated occurrences of one id in batch order.
create or replace function invsync_private.batch_items(batch jsonb)
returns table (
  rn bigint, id uuid,
  barcode text, barcode_hlc bigint, barcode_writer text,
  name text, name_hlc bigint, name_writer text,
  kind text, kind_hlc bigint, kind_writer text,
  location text, location_hlc bigint, location_writer text,
  category text, category_hlc bigint, category_writer text,
  notes text, notes_hlc bigint, notes_writer text,
  status text, status_hlc bigint, status_writer text,
  sheet text, sheet_hlc bigint, sheet_writer text,
  deleted boolean, deleted_hlc bigint, deleted_writer text,
  stock integer, stock_version bigint, stock_kind_hlc bigint
)
language sql
immutable
set search_path = ''
as $$
  select
    row_number() over (partition by i.id order by i.n),
    i.id,
    case when f ? 'barcode' then f -> 'barcode' ->> 0 else '' end,
    coalesce((f -> 'barcode' ->> 1)::bigint, 0), coalesce(f -> 'barcode' ->> 2, ''),
    case when f ? 'name' then f -> 'name' ->> 0 else '' end,
    coalesce((f -> 'name' ->> 1)::bigint, 0), coalesce(f -> 'name' ->> 2, ''),
    case when f ? 'kind' then f -> 'kind' ->> 0 else 'bulk' end,
    coalesce((f -> 'kind' ->> 1)::bigint, 0), coalesce(f -> 'kind' ->> 2, ''),
    case when f ? 'location' then f -> 'location' ->> 0 else '' end,
    coalesce((f -> 'location' ->> 1)::bigint, 0), coalesce(f -> 'location' ->> 2, ''),
    case when f ? 'category' then f -> 'category' ->> 0 else '' end,
    coalesce((f -> 'category' ->> 1)::bigint, 0), coalesce(f -> 'category' ->> 2, ''),
    case when f ? 'notes' then f -> 'notes' ->> 0 else '' end,
    coalesce((f -> 'notes' ->> 1)::bigint, 0), coalesce(f -> 'notes' ->> 2, ''),
    case when f ? 'status' then f -> 'status' ->> 0 else 'in' end,
    coalesce((f -> 'status' ->> 1)::bigint, 0), coalesce(f -> 'status' ->> 2, ''),
    f -> 'sheet' ->> 0,
    coalesce((f -> 'sheet' ->> 1)::bigint, 0), coalesce(f -> 'sheet' ->> 2, ''),
    case when f ? 'deleted' then (f -> 'deleted' ->> 0)::boolean else false end,
    coalesce((f -> 'deleted' ->> 1)::bigint, 0), coalesce(f -> 'deleted' ->> 2, ''),
    coalesce((i.item -> 'stock' ->> 0)::integer, 0),
    coalesce((i.item -> 'stock' ->> 1)::bigint, 0),
    coalesce((i.item -> 'stock' ->> 2)::bigint, 0)
  from (
    select e.item, e.n, (e.item ->> 'id')::uuid as id, coalesce(e.item -> 'fields', '{}') as f
    from jsonb_array_elements(coalesce(batch -> 'items', '[]')) with ordinality as e(item, n)
  ) as i
$$;

-- Push: merge a batch of item states and movements from one station's merged view.
--   batch = {"fleet": F, "origin": "station:ID",
--            "items": [{"id": uuid, "fields": {"name": [value, hlc] or [value, hlc, writer]},
--                       "stock": [value, version, kind_hlc]}],
--            "movements": [{"id","hlc","station","operator","item","barcode","op","qty",
--                           "sheet"}]}
-- A field moves only to a strictly greater (hlc, writer); `writer` (the station whose slot
-- won in the CRDT, '' when absent) only breaks ties between equal HLCs the way the CRDT
-- does. Stock moves only to a strictly greater (kind_hlc, version): `version` is the sum
-- of the counter slot HLCs (bulk) or the status HLC (serial), comparable only under one
-- kind, and `kind_hlc` is the HLC of the `kind` field of the pushing view (0 if absent).
-- Returns {"items_changed": n, "movements_inserted": m}.
create or replace function public.merge_inventory(batch jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  p_fleet text := batch ->> 'fleet';
  p_origin text := coalesce(batch ->> 'origin', 'station');
  item_count bigint := 0;
  movement_count bigint := 0;
  changed bigint;
  rounds int;
begin
  perform invsync_private.check_caller(p_fleet);
  if jsonb_typeof(coalesce(batch -> 'items', '[]')) <> 'array'
      or jsonb_typeof(coalesce(batch -> 'movements', '[]')) <> 'array' then
    raise exception 'invsync: the batch''s items and movements must be arrays'
      using errcode = 'raise_exception';
  end if;
  -- With this function running as the table's owner, the web-edit triggers skip these
  -- writes (bridge_writing()).
  perform pg_catalog.set_config('invsync.bridge', 'on', true);

  if exists (
    select 1
    from jsonb_array_elements(coalesce(batch -> 'items', '[]')) as e(item)
    join public.inventory_items t on t.id = (e.item ->> 'id')::uuid
    where t.fleet <> p_fleet
  ) then
    raise exception 'the batch names an item of another fleet'
      using errcode = 'check_violation';
  end if;

  -- The same id twice in one batch would make INSERT .. ON CONFLICT fail, so each
  -- occurrence is merged in its own round (there is one round unless the sender repeats).
  select coalesce(max(s.rn), 0) into rounds from invsync_private.batch_items(batch) as s;
  for round in 1..rounds loop
    -- Rows are written in id order so two bridges pushing overlapping batches lock them
    -- in the same order and cannot deadlock.
    insert into public.inventory_items as t (
      id, fleet,
      barcode, barcode_hlc, barcode_writer, name, name_hlc, name_writer,
      kind, kind_hlc, kind_writer, location, location_hlc, location_writer,
      category, category_hlc, category_writer, notes, notes_hlc, notes_writer,
      status, status_hlc, status_writer, sheet, sheet_hlc, sheet_writer,
      deleted, deleted_hlc, deleted_writer, stock, stock_version, stock_kind_hlc, origin,
      updated_at)
    select
      s.id, p_fleet,
      s.barcode, s.barcode_hlc, s.barcode_writer, s.name, s.name_hlc, s.name_writer,
      s.kind, s.kind_hlc, s.kind_writer, s.location, s.location_hlc, s.location_writer,
      s.category, s.category_hlc, s.category_writer, s.notes, s.notes_hlc, s.notes_writer,
      s.status, s.status_hlc, s.status_writer, s.sheet, s.sheet_hlc, s.sheet_writer,
      s.deleted, s.deleted_hlc, s.deleted_writer, s.stock, s.stock_version, s.stock_kind_hlc,
      p_origin, now()
    from invsync_private.batch_items(batch) as s
    where s.rn = round
    order by s.id
    on conflict (id) do update set
      barcode = case when (excluded.barcode_hlc, excluded.barcode_writer collate "C")
          > (t.barcode_hlc, t.barcode_writer collate "C")
        then excluded.barcode else t.barcode end,
      barcode_writer = case when (excluded.barcode_hlc, excluded.barcode_writer collate "C")
          > (t.barcode_hlc, t.barcode_writer collate "C")
        then excluded.barcode_writer else t.barcode_writer end,
      barcode_hlc = greatest(t.barcode_hlc, excluded.barcode_hlc),
      name = case when (excluded.name_hlc, excluded.name_writer collate "C")
          > (t.name_hlc, t.name_writer collate "C")
        then excluded.name else t.name end,
      name_writer = case when (excluded.name_hlc, excluded.name_writer collate "C")
          > (t.name_hlc, t.name_writer collate "C")
        then excluded.name_writer else t.name_writer end,
      name_hlc = greatest(t.name_hlc, excluded.name_hlc),
      kind = case when (excluded.kind_hlc, excluded.kind_writer collate "C")
          > (t.kind_hlc, t.kind_writer collate "C")
        then excluded.kind else t.kind end,
      kind_writer = case when (excluded.kind_hlc, excluded.kind_writer collate "C")
          > (t.kind_hlc, t.kind_writer collate "C")
        then excluded.kind_writer else t.kind_writer end,
      kind_hlc = greatest(t.kind_hlc, excluded.kind_hlc),
      location = case when (excluded.location_hlc, excluded.location_writer collate "C")
          > (t.location_hlc, t.location_writer collate "C")
        then excluded.location else t.location end,
      location_writer = case when (excluded.location_hlc, excluded.location_writer collate "C")
          > (t.location_hlc, t.location_writer collate "C")
        then excluded.location_writer else t.location_writer end,
      location_hlc = greatest(t.location_hlc, excluded.location_hlc),
      category = case when (excluded.category_hlc, excluded.category_writer collate "C")
          > (t.category_hlc, t.category_writer collate "C")
        then excluded.category else t.category end,
      category_writer = case when (excluded.category_hlc, excluded.category_writer collate "C")
          > (t.category_hlc, t.category_writer collate "C")
        then excluded.category_writer else t.category_writer end,
      category_hlc = greatest(t.category_hlc, excluded.category_hlc),
      notes = case when (excluded.notes_hlc, excluded.notes_writer collate "C")
          > (t.notes_hlc, t.notes_writer collate "C")
        then excluded.notes else t.notes end,
      notes_writer = case when (excluded.notes_hlc, excluded.notes_writer collate "C")
          > (t.notes_hlc, t.notes_writer collate "C")
        then excluded.notes_writer else t.notes_writer end,
      notes_hlc = greatest(t.notes_hlc, excluded.notes_hlc),
      status = case when (excluded.status_hlc, excluded.status_writer collate "C")
          > (t.status_hlc, t.status_writer collate "C")
        then excluded.status else t.status end,
      status_writer = case when (excluded.status_hlc, excluded.status_writer collate "C")
          > (t.status_hlc, t.status_writer collate "C")
        then excluded.status_writer else t.status_writer end,
      status_hlc = greatest(t.status_hlc, excluded.status_hlc),
      sheet = case when (excluded.sheet_hlc, excluded.sheet_writer collate "C")
          > (t.sheet_hlc, t.sheet_writer collate "C")
        then excluded.sheet else t.sheet end,
      sheet_writer = case when (excluded.sheet_hlc, excluded.sheet_writer collate "C")
          > (t.sheet_hlc, t.sheet_writer collate "C")
        then excluded.sheet_writer else t.sheet_writer end,
      sheet_hlc = greatest(t.sheet_hlc, excluded.sheet_hlc),
      deleted = case when (excluded.deleted_hlc, excluded.deleted_writer collate "C")
          > (t.deleted_hlc, t.deleted_writer collate "C")
        then excluded.deleted else t.deleted end,
      deleted_writer = case when (excluded.deleted_hlc, excluded.deleted_writer collate "C")
          > (t.deleted_hlc, t.deleted_writer collate "C")
        then excluded.deleted_writer else t.deleted_writer end,
      deleted_hlc = greatest(t.deleted_hlc, excluded.deleted_hlc),
      stock = case when (excluded.stock_kind_hlc, excluded.stock_version)
          > (t.stock_kind_hlc, t.stock_version)
        then excluded.stock else t.stock end,
      stock_version = case when (excluded.stock_kind_hlc, excluded.stock_version)
          > (t.stock_kind_hlc, t.stock_version)
        then excluded.stock_version else t.stock_version end,
      stock_kind_hlc = greatest(t.stock_kind_hlc, excluded.stock_kind_hlc),
      origin = excluded.origin,
      updated_at = excluded.updated_at
    where t.fleet = excluded.fleet and (
      (excluded.barcode_hlc, excluded.barcode_writer collate "C")
        > (t.barcode_hlc, t.barcode_writer collate "C")
      or (excluded.name_hlc, excluded.name_writer collate "C")
        > (t.name_hlc, t.name_writer collate "C")
      or (excluded.kind_hlc, excluded.kind_writer collate "C")
        > (t.kind_hlc, t.kind_writer collate "C")
      or (excluded.location_hlc, excluded.location_writer collate "C")
        > (t.location_hlc, t.location_writer collate "C")
      or (excluded.category_hlc, excluded.category_writer collate "C")
        > (t.category_hlc, t.category_writer collate "C")
      or (excluded.notes_hlc, excluded.notes_writer collate "C")
        > (t.notes_hlc, t.notes_writer collate "C")
      or (excluded.status_hlc, excluded.status_writer collate "C")
        > (t.status_hlc, t.status_writer collate "C")
      or (excluded.sheet_hlc, excluded.sheet_writer collate "C")
        > (t.sheet_hlc, t.sheet_writer collate "C")
      or (excluded.deleted_hlc, excluded.deleted_writer collate "C")
        > (t.deleted_hlc, t.deleted_writer collate "C")
      or (excluded.stock_kind_hlc, excluded.stock_version)
        > (t.stock_kind_hlc, t.stock_version));
    get diagnostics changed = row_count;
    item_count := item_count + changed;
  end loop;

  insert into public.inventory_movements as m (
    id, fleet, hlc, station, operator, item_id, barcode, op, qty, sheet)
  select
    e.mv ->> 'id', p_fleet, (e.mv ->> 'hlc')::bigint, e.mv ->> 'station',
    coalesce(e.mv ->> 'operator', ''), (e.mv ->> 'item')::uuid, coalesce(e.mv ->> 'barcode', ''),
    e.mv ->> 'op', (e.mv ->> 'qty')::integer, e.mv ->> 'sheet'
  from jsonb_array_elements(coalesce(batch -> 'movements', '[]')) as e(mv)
  order by e.mv ->> 'id'
  on conflict (id) do nothing;
  get diagnostics movement_count = row_count;

  perform pg_catalog.set_config('invsync.bridge', 'off', true);
  return jsonb_build_object('items_changed', item_count, 'movements_inserted', movement_count);
end
$$;

-- Pull: web edits of `fleet` after `cursor`.
--   -> {"changes": [{"change_id": n, "item": uuid, "fields": {field: [value, hlc]}}],
--       "cursor": "<txid>:<change_id>:<database id>", "more": bool,
--       "reset": bool, "database": uuid}
-- The cursor "T:C:D" means: every change of a transaction below T, and those of T up to
-- change C, were returned by database D. Only transactions below the current snapshot's
-- xmin are read: none of them is still running, so nothing can later appear behind the
-- cursor (a monotonic id or a timestamp would skip an edit whose transaction commits
-- late). A change may be returned twice across calls; applying it is idempotent.
-- A cursor this database cannot have given (another database's id, a transaction this
-- database has not reached yet: a restore or a new database at the same URL; or no
-- cursor form at all) starts over from the first change, and the answer says
-- "reset": true. "database" is invsync_database_id().
create or replace function public.pull_changes(fleet text, cursor text, max_rows integer)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  p_fleet text := $1;
  db_id uuid := (select d.id from invsync_private.database_instance d);
  after_txid xid8 := '0';
  after_change bigint := 0;
  snap pg_snapshot := pg_catalog.pg_current_snapshot();
  horizon xid8 := pg_catalog.pg_snapshot_xmin(snap);
  wanted int := least(greatest(coalesce($3, 500), 1), 10000);
  was_reset boolean := false;
  parts text[];
  result jsonb;
  got int;
  last_txid xid8;
  last_change bigint;
begin
  perform invsync_private.check_caller(p_fleet);
  if coalesce($2, '') <> '' then
    parts := pg_catalog.regexp_match($2, '^([0-9]{1,20}):([0-9]{1,18}):([0-9a-f-]{36})$');
    if parts is null or parts[3] <> db_id::text
        or parts[1]::numeric > pg_catalog.pg_snapshot_xmax(snap)::text::numeric then
      was_reset := true;
    else
      after_txid := parts[1]::xid8;
      after_change := parts[2]::bigint;
    end if;
  end if;

  select
    coalesce(jsonb_agg(jsonb_build_object(
      'change_id', c.change_id, 'item', c.item_id, 'fields', c.fields)
      order by c.txid, c.change_id), '[]'),
    count(*),
    (array_agg(c.txid order by c.txid desc, c.change_id desc))[1],
    (array_agg(c.change_id order by c.txid desc, c.change_id desc))[1]
  into result, got, last_txid, last_change
  from (
    select ch.change_id, ch.txid, ch.item_id, ch.fields
    from public.inventory_changes ch
    where ch.fleet = p_fleet
      and ch.txid < horizon
      and (ch.txid > after_txid or (ch.txid = after_txid and ch.change_id > after_change))
    order by ch.txid, ch.change_id
    limit wanted
  ) as c;

  if got = wanted then
    return jsonb_build_object(
      'changes', result, 'cursor', last_txid::text || ':' || last_change || ':' || db_id,
      'more', true, 'reset', was_reset, 'database', db_id);
  end if;
  -- Everything below the horizon has been returned by now.
  return jsonb_build_object(
    'changes', result,
    'cursor', greatest(horizon, after_txid)::text || ':'
      || case when horizon > after_txid then 0 else after_change end || ':' || db_id,
    'more', false, 'reset', was_reset, 'database', db_id);
end
$$;
