"""Views over shared tables, kept in public (managed by alembic_utils).

Definitions use unqualified table names (the migration sets search_path) and
read only shared tables, so they are the same for every environment.
"""

from __future__ import annotations

from alembic_utils.pg_view import PGView

v_service_health = PGView(
    schema="public",
    signature="v_service_health",
    definition="""
select s.id as service_id,
       s.environment,
       s.name,
       s.kind,
       s.endpoint,
       s.is_enabled,
       c.status as last_status,
       c.checked_at as last_checked_at,
       c.response_time_ms as last_response_time_ms,
       c.status_code as last_status_code,
       c.error as last_error
from monitor_services s
left join lateral (
    select h.status, h.checked_at, h.response_time_ms, h.status_code, h.error
    from monitor_health_checks h
    where h.service_id = s.id
    order by h.checked_at desc
    limit 1
) c on true
""",
)

v_recent_anomalies = PGView(
    schema="public",
    signature="v_recent_anomalies",
    definition="""
select a.id as anomaly_id,
       a.api_key_id,
       k.environment,
       k.name as api_key_name,
       k.key_prefix,
       a.kind,
       a.severity,
       a.description,
       a.detected_at,
       a.is_resolved,
       a.resolved_at
from api_key_anomalies a
join api_keys k on k.id = a.api_key_id
where a.detected_at >= now() - interval '7 days'
""",
)

v_idle_workflows = PGView(
    schema="public",
    signature="v_idle_workflows",
    definition="""
select w.id as workflow_id,
       w.environment,
       w.n8n_workflow_id,
       w.name,
       w.last_run_at,
       w.last_status,
       w.idle_threshold_minutes,
       now() - coalesce(w.last_run_at, w.created_at) as idle_for
from monitor_workflows w
where w.is_active
  and coalesce(w.last_run_at, w.created_at)
      < now() - make_interval(mins => w.idle_threshold_minutes)
""",
)

v_storage_overview = PGView(
    schema="public",
    signature="v_storage_overview",
    definition="""
select v.id as volume_id,
       v.name,
       v.kind,
       v.mount_path,
       v.node_id,
       coalesce(u.total_bytes, v.capacity_bytes) as total_bytes,
       u.used_bytes,
       u.free_bytes,
       u.captured_at,
       round(100.0 * u.used_bytes / nullif(coalesce(u.total_bytes, v.capacity_bytes), 0), 2)
           as used_percent,
       case
           when u.used_bytes is null then 'unknown'
           when 100.0 * u.used_bytes / nullif(coalesce(u.total_bytes, v.capacity_bytes), 0)
                >= v.critical_percent then 'critical'
           when 100.0 * u.used_bytes / nullif(coalesce(u.total_bytes, v.capacity_bytes), 0)
                >= v.warn_percent then 'warning'
           else 'ok'
       end as level
from storage_volumes v
left join lateral (
    select s.total_bytes, s.used_bytes, s.free_bytes, s.captured_at
    from storage_usage_snapshots s
    where s.volume_id = v.id
    order by s.captured_at desc
    limit 1
) u on true
where v.is_active
""",
)

VIEWS = (v_idle_workflows, v_recent_anomalies, v_service_health, v_storage_overview)
