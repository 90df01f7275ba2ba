-- invsync cloud contract, part 1: the tables, the web-edit trigger and the two bridge
-- functions. Runs unmodified on a Supabase project (SQL editor or `invsync cloud migrate`)
-- and on plain PostgreSQL 15+. Part 2 (002_access.sql) decides who may call and read what.
--
-- Clocks: every field carries the hybrid logical clock (HLC) of the write that set it, an
-- integer below 2**53 (milliseconds << 11 | counter), compared as bigint. A field only ever
-- moves to a strictly greater (hlc, writer), so replayed and stale batches change nothing
-- and several bridges pushing at once converge.

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
  id uuid primary key default invsync_private.uuid7(),
  fleet text not null default invsync_private.jwt_fleet()
    check (length(fleet) between 1 and 64),
  barcode text not null default ''
    check (barcode = '' or barcode ~ '^[!-~]{1,64}$'),
  barcode_hlc bigint not null default 0,
  barcode_writer text not null default '',
  name text not null default '' check (length(name) <= 200),
  name_hlc bigint not null default 0,
  name_writer text not null default '',
  kind text not null default 'bulk' check (kind in ('bulk', 'serial')),
  kind_hlc bigint not null default 0,
  kind_writer text not null default '',
  location text not null default '' check (length(location) <= 100),
  location_hlc bigint not null default 0,
  location_writer text not null default '',
  category text not null default '' check (length(category) <= 100),
  category_hlc bigint not null default 0,
  category_writer text not null default '',
  notes text not null default '' check (length(notes) <= 2000),
  notes_hlc bigint not null default 0,
  notes_writer text not null default '',
  status text not null default 'in' check (status in ('in', 'out', 'repair', 'lost')),
  status_hlc bigint not null default 0,
  status_writer text not null default '',
  sheet text check (sheet is null or length(sheet) between 1 and 64),
  sheet_hlc bigint not null default 0,
  sheet_writer text not null default '',
  deleted boolean not null default false,
  deleted_hlc bigint not null default 0,
  deleted_writer text not null default '',
  stock integer not null default 0 check (stock between -1000000000 and 1000000000),
  -- The sum of the station's stock slot HLCs: it only grows as a view learns more.
  stock_version bigint not null default 0,
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

-- Web edits (web app, SQL editor, anyone but the bridge): stamp each changed field with a
-- server HLC above every HLC in the row, mark the row as the web's, and log the change.
create or replace function invsync_private.stamp_web_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  hlc bigint;
  changed jsonb := '{}';
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
    changed := jsonb_build_object(
      'barcode', jsonb_build_array(new.barcode, hlc),
      'name', jsonb_build_array(new.name, hlc),
      'kind', jsonb_build_array(new.kind, hlc),
      'location', jsonb_build_array(new.location, hlc),
      'category', jsonb_build_array(new.category, hlc),
      'notes', jsonb_build_array(new.notes, hlc),
      'status', jsonb_build_array(new.status, hlc),
      'sheet', jsonb_build_array(new.sheet, hlc),
      'deleted', jsonb_build_array(new.deleted, hlc),
      'stock', jsonb_build_array(new.stock, hlc, 0)
    );
  else
    if new.id is distinct from old.id or new.fleet is distinct from old.fleet then
      raise exception 'an item keeps its id and fleet'
        using errcode = 'check_violation';
    end if;
    hlc := invsync_private.server_hlc(greatest(
      old.barcode_hlc, old.name_hlc, old.kind_hlc, old.location_hlc, old.category_hlc,
      old.notes_hlc, old.status_hlc, old.sheet_hlc, old.deleted_hlc));
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
    if new.barcode is distinct from old.barcode then
      new.barcode_hlc := hlc; new.barcode_writer := 'cloud';
      changed := changed || jsonb_build_object('barcode', jsonb_build_array(new.barcode, hlc));
    end if;
    if new.name is distinct from old.name then
      new.name_hlc := hlc; new.name_writer := 'cloud';
      changed := changed || jsonb_build_object('name', jsonb_build_array(new.name, hlc));
    end if;
    if new.kind is distinct from old.kind then
      new.kind_hlc := hlc; new.kind_writer := 'cloud';
      changed := changed || jsonb_build_object('kind', jsonb_build_array(new.kind, hlc));
    end if;
    if new.location is distinct from old.location then
      new.location_hlc := hlc; new.location_writer := 'cloud';
      changed := changed || jsonb_build_object('location', jsonb_build_array(new.location, hlc));
    end if;
    if new.category is distinct from old.category then
      new.category_hlc := hlc; new.category_writer := 'cloud';
      changed := changed || jsonb_build_object('category', jsonb_build_array(new.category, hlc));
    end if;
    if new.notes is distinct from old.notes then
      new.notes_hlc := hlc; new.notes_writer := 'cloud';
      changed := changed || jsonb_build_object('notes', jsonb_build_array(new.notes, hlc));
    end if;
    if new.status is distinct from old.status then
      new.status_hlc := hlc; new.status_writer := 'cloud';
      changed := changed || jsonb_build_object('status', jsonb_build_array(new.status, hlc));
    end if;
    if new.sheet is distinct from old.sheet then
      new.sheet_hlc := hlc; new.sheet_writer := 'cloud';
      changed := changed || jsonb_build_object('sheet', jsonb_build_array(new.sheet, hlc));
    end if;
    if new.deleted is distinct from old.deleted then
      new.deleted_hlc := hlc; new.deleted_writer := 'cloud';
      changed := changed || jsonb_build_object('deleted', jsonb_build_array(new.deleted, hlc));
    end if;
    -- Stock stays a counter on the stations: a web edit of it is a count, applied there
    -- as the difference from the stock the cloud showed (the third element, so every
    -- station adds the same amount); stock_version is left alone so the next push of a
    -- station that has applied the count replaces this value with the merged one.
    if new.stock is distinct from old.stock then
      changed := changed || jsonb_build_object('stock', jsonb_build_array(new.stock, hlc, old.stock));
    end if;
    if changed = '{}' then
      new.origin := old.origin;
      new.updated_at := old.updated_at;
      return new;
    end if;
  end if;
  new.origin := 'web';
  new.updated_at := now();
  insert into public.inventory_changes (fleet, item_id, fields)
  values (new.fleet, new.id, changed);
  return new;
end
$$;

-- The bridge marks its own writes with a transaction-local setting; the WHEN clause keeps
-- the trigger function from even being called for them.
create trigger inventory_items_web_edit
before insert or update on public.inventory_items
for each row
when (pg_catalog.current_setting('invsync.bridge', true) is distinct from 'on')
execute function invsync_private.stamp_web_edit();

-- Who may act for `fleet`: a Supabase *station* user (JWT claims) only for the fleet in
-- its app_metadata, and only if app_metadata marks it as a station ("invsync_station":
-- true), so a web user of the fleet cannot push made-up clocks; the service role for any;
-- a direct connection only as a member of invsync_bridge (role created in 002_access.sql).
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
    raise exception 'the batch needs a fleet' using errcode = 'invalid_parameter_value';
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
  stock integer, stock_version bigint
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
    coalesce((i.item -> 'stock' ->> 1)::bigint, 0)
  from (
    select e.item, e.n, (e.item ->> 'id')::uuid as id, coalesce(e.item -> 'fields', '{}') as f
    from jsonb_array_elements(coalesce(batch -> 'items', '[]')) with ordinality as e(item, n)
  ) as i
$$;

-- Push: merge a batch of item states and movements from one station's merged view.
--   batch = {"fleet": F, "origin": "station:ID",
--            "items": [{"id": uuid, "fields": {"name": [value, hlc] or [value, hlc, writer]},
--                       "stock": [value, version]}],
--            "movements": [{"id","hlc","station","operator","item","barcode","op","qty",
--                           "sheet"}]}
-- A field moves only to a strictly greater (hlc, writer); `writer` (the station whose slot
-- won in the CRDT, '' when absent) only breaks ties between equal HLCs the way the CRDT
-- does. Returns {"items_changed": n, "movements_inserted": m}.
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
    raise exception 'items and movements must be arrays'
      using errcode = 'invalid_parameter_value';
  end if;
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
      deleted, deleted_hlc, deleted_writer, stock, stock_version, origin, updated_at)
    select
      s.id, p_fleet,
      s.barcode, s.barcode_hlc, s.barcode_writer, s.name, s.name_hlc, s.name_writer,
      s.kind, s.kind_hlc, s.kind_writer, s.location, s.location_hlc, s.location_writer,
      s.category, s.category_hlc, s.category_writer, s.notes, s.notes_hlc, s.notes_writer,
      s.status, s.status_hlc, s.status_writer, s.sheet, s.sheet_hlc, s.sheet_writer,
      s.deleted, s.deleted_hlc, s.deleted_writer, s.stock, s.stock_version, p_origin, now()
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
      stock = case when excluded.stock_version > t.stock_version
        then excluded.stock else t.stock end,
      stock_version = greatest(t.stock_version, excluded.stock_version),
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
      or excluded.stock_version > t.stock_version);
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
--       "cursor": "<txid>:<change_id>", "more": bool}
-- The cursor "T:C" means: every change of a transaction below T, and those of T up to
-- change C, were returned. Only transactions below the current snapshot's xmin are read:
-- none of them is still running, so nothing can later appear behind the cursor (a
-- monotonic id or a timestamp would skip an edit whose transaction commits late). A
-- change may be returned twice across calls; applying it is idempotent.
create or replace function public.pull_changes(fleet text, cursor text, max_rows integer)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  p_fleet text := $1;
  after_txid xid8 := '0';
  after_change bigint := 0;
  horizon xid8 := pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot());
  wanted int := least(greatest(coalesce($3, 500), 1), 10000);
  result jsonb;
  got int;
  last_txid xid8;
  last_change bigint;
begin
  perform invsync_private.check_caller(p_fleet);
  if coalesce($2, '') <> '' then
    if $2 !~ '^[0-9]{1,20}:[0-9]{1,20}$' then
      raise exception 'bad cursor %', $2 using errcode = 'invalid_parameter_value';
    end if;
    after_txid := split_part($2, ':', 1)::xid8;
    after_change := split_part($2, ':', 2)::bigint;
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
      'changes', result, 'cursor', last_txid::text || ':' || last_change, 'more', true);
  end if;
  -- Everything below the horizon has been returned by now.
  return jsonb_build_object(
    'changes', result,
    'cursor', greatest(horizon, after_txid)::text || ':'
      || case when horizon > after_txid then 0 else after_change end,
    'more', false);
end
$$;
