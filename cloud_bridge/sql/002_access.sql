-- invsync cloud contract, part 2: who may call and read what.
--
-- * Supabase users (role `authenticated`, JWT claims from Supabase Auth) see and edit only
--   the items of the fleet in their `app_metadata.fleet`; station users push and pull
--   through the two functions, which check the same claim. Items are never hard-deleted
--   from the web app: it sets `deleted = true`, which reaches the stations like any edit.
-- * `anon` gets nothing.
-- * `invsync_bridge` is the group role for direct Postgres connections (on-premise
--   servers): its members may only execute the bridge functions, for any fleet of the
--   database; they read no table. It cannot log in itself: each station gets a login role
--   in it (`create role dock_a login password '...' in role invsync_bridge`), so a
--   station's password can be changed or its role dropped without touching the others.
-- On plain PostgreSQL the Supabase roles are created here, so policies and grants have
-- someone to name; on Supabase they already exist and are left as they are.

do $$
begin
  if not exists (select from pg_catalog.pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'invsync_bridge') then
    create role invsync_bridge nologin noinherit;
  elsif exists (
    select from pg_catalog.pg_roles where rolname = 'invsync_bridge' and rolcanlogin
  ) then
    alter role invsync_bridge nologin;
  end if;
end
$$;

-- Supabase grants everything in `public` to anon and authenticated by default privileges;
-- start from nothing and grant back exactly what each role needs.
revoke all on table public.inventory_items, public.inventory_movements,
  public.inventory_changes
  from public, anon, authenticated, service_role, invsync_bridge;
grant select, insert, update on table public.inventory_items to authenticated;
grant select on table public.inventory_movements to authenticated;
grant select, insert, update, delete on table public.inventory_items,
  public.inventory_movements, public.inventory_changes to service_role;

alter table public.inventory_items enable row level security;
alter table public.inventory_movements enable row level security;
alter table public.inventory_changes enable row level security;

-- `(select ...)` lets the planner evaluate the claim once per statement, not per row.
create policy inventory_items_read on public.inventory_items
  for select to authenticated
  using (fleet = (select invsync_private.jwt_fleet()));
create policy inventory_items_add on public.inventory_items
  for insert to authenticated
  with check (fleet = (select invsync_private.jwt_fleet()));
create policy inventory_items_edit on public.inventory_items
  for update to authenticated
  using (fleet = (select invsync_private.jwt_fleet()))
  with check (fleet = (select invsync_private.jwt_fleet()));
create policy inventory_movements_read on public.inventory_movements
  for select to authenticated
  using (fleet = (select invsync_private.jwt_fleet()));
-- inventory_changes has no policy: only the bridge functions (its owner) read it.

revoke all on schema invsync_private from public, anon;
grant usage on schema invsync_private to authenticated, service_role;
revoke all on all tables in schema invsync_private
  from public, anon, authenticated, service_role, invsync_bridge;
revoke all on all functions in schema invsync_private
  from public, anon, authenticated, service_role, invsync_bridge;
-- Column defaults and policies run as the web user: they need these three.
grant execute on function invsync_private.jwt_claims(), invsync_private.jwt_fleet(),
  invsync_private.uuid7() to authenticated, service_role;
-- The web-edit triggers' WHEN clause runs as whoever writes the table, whichever role
-- that is; it only tells whether this is merge_inventory writing.
grant execute on function invsync_private.bridge_writing() to public;

revoke all on function public.merge_inventory(jsonb),
  public.pull_changes(text, text, integer), public.invsync_database_id()
  from public, anon, authenticated, service_role, invsync_bridge;
grant execute on function public.merge_inventory(jsonb),
  public.pull_changes(text, text, integer), public.invsync_database_id()
  to authenticated, service_role, invsync_bridge;
