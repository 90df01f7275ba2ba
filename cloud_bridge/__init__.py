"""Push/pull between the merged inventory and Supabase/Postgres; its SQL migrations."""
