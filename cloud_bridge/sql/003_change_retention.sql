-- invsync cloud contract, part 3: how long web edits are kept.
--
-- `inventory_changes` is the log of web edits the bridges pull. A change is deleted once
-- it is older than the retention (`invsync_private.change_retention`, 30 days unless set
-- otherwise) *and* every bridge of its fleet that pulled within that time has pulled it:
-- each pull records how far its caller has got (the cursor it passes in), and deletes up
-- to 1,000 such changes of its fleet. A bridge that stopped pulling longer ago than the
-- retention no longer holds changes back; when it comes back, the edits deleted meanwhile
-- reach its station from the bridges that pulled them, through peer sync, like any
-- change made elsewhere in the fleet. A fleet whose bridges all stopped keeps everything.

create table invsync_private.change_retention (
  only_row boolean primary key default true check (only_row),
  keep interval not null default interval '30 days' check (keep >= interval '1 day')
);

insert into invsync_private.change_retention default values;

-- How far each bridge has pulled: `pulled_below` is the transaction below which it has
-- every change of its fleet (the first part of the cursor it passed; 0 for none).
create table invsync_private.bridge_pulls (
  fleet text not null,
  caller text not null,
  pulled_below xid8 not null,
  pulled_at timestamptz not null default now(),
  primary key (fleet, caller)
);

revoke all on table invsync_private.change_retention, invsync_private.bridge_pulls
  from public, anon, authenticated, service_role, invsync_bridge;

-- Who is pulling: the Supabase user (a station's own user), the JWT role when there is
-- no user (the service role), or the login role of a direct connection.
create or replace function invsync_private.caller_name()
returns text
language sql
stable
set search_path = ''
as $$
  select coalesce(
    invsync_private.jwt_claims() ->> 'sub',
    invsync_private.jwt_claims() ->> 'role',
    'role:' || session_user
  )
$$;

-- Record that the caller has every change of `fleet` below `pulled_below`, then delete
-- up to 1,000 changes that every bridge active within the retention has, and that are
-- older than it. Rows another pull is deleting at the same moment are skipped.
create or replace function invsync_private.prune_changes(p_fleet text, pulled_below xid8)
returns integer
language plpgsql
volatile
set search_path = ''
as $$
declare
  keep interval := (select r.keep from invsync_private.change_retention r);
  everyone_has xid8;
  pruned integer;
begin
  insert into invsync_private.bridge_pulls as b (fleet, caller, pulled_below, pulled_at)
  values (p_fleet, invsync_private.caller_name(), pulled_below, pg_catalog.now())
  on conflict (fleet, caller) do update
    set pulled_below = excluded.pulled_below, pulled_at = excluded.pulled_at;

  select min(b.pulled_below) into everyone_has
  from invsync_private.bridge_pulls b
  where b.fleet = p_fleet and b.pulled_at > pg_catalog.now() - keep;

  delete from public.inventory_changes ch
  where ch.ctid = any (array(
    select c.ctid
    from public.inventory_changes c
    where c.fleet = p_fleet
      and c.txid < everyone_has
      and c.recorded_at < pg_catalog.now() - keep
    order by c.txid, c.change_id
    limit 1000
    for update skip locked
  ));
  get diagnostics pruned = row_count;
  return pruned;
end
$$;

revoke all on function invsync_private.caller_name(), invsync_private.prune_changes(text, xid8)
  from public, anon, authenticated, service_role, invsync_bridge;

-- pull_changes as in 001, but volatile (it now writes) and pruning as it pulls.
create or replace function public.pull_changes(fleet text, cursor text, max_rows integer)
returns jsonb
language plpgsql
volatile
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

  perform invsync_private.prune_changes(p_fleet, after_txid);

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

-- PostgREST runs a POST to a stable function read-only, and learns volatility from its
-- schema cache: have it reload now (Supabase's own DDL trigger normally does; on plain
-- PostgreSQL nobody listens).
notify pgrst, 'reload schema';
